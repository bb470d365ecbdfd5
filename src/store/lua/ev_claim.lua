-- claim_events (no gate: events outlive their session). KEYS: s, ev, evq, evs.
-- ARGV: now, lease_until (ms, precomputed), limit.
-- Reply: {session exists (0|1), pending, next due ('' for none), {seq, event, state, ...}}.
-- Takes the due pending events (the earliest due, in sequence order) and re-scores them to the lease end, so
-- no other claim gets them until then. An event whose record ran out is dropped.
local due = call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
-- Handed out in sequence order (the order of the changes).
table.sort(due, function(a, b) return tonumber(a) < tonumber(b) end)
local out = {}
for _, seq in ipairs(due) do
  local e = call('HGET', KEYS[2], seq)
  if e then
    call('ZADD', KEYS[3], 'XX', ARGV[2], seq)
    out[#out + 1] = seq
    out[#out + 1] = e
    out[#out + 1] = call('HGET', KEYS[4], seq) or ''
  else
    call('ZREM', KEYS[3], seq)
  end
end
local next_due = call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
return {call('EXISTS', SKEY), call('ZCARD', KEYS[3]), next_due[2] or '', out}
