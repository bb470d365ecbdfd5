-- list_events of one session (no gate). KEYS: s, ev, evq, evs, evd.
-- ARGV: _, 'pending' | 'failed', after (sequence number, 0 for all), limit.
-- Reply: {seq, event, state, score, ...} in sequence order: the pending events (score:
-- when due) or the dead-lettered ones (score: when), after `after`, at most `limit`.
local set = KEYS[3]
if ARGV[2] == 'failed' then set = KEYS[5] end
local all = call('ZRANGE', set, 0, -1, 'WITHSCORES')
local rows = {}
local after = tonumber(ARGV[3])
for i = 1, #all, 2 do
  local n = tonumber(all[i])
  if n and n > after then rows[#rows + 1] = {n, all[i], all[i + 1]} end
end
table.sort(rows, function(a, b) return a[1] < b[1] end)
local out = {}
local limit = tonumber(ARGV[4])
for i, row in ipairs(rows) do
  if i > limit then break end
  local e = call('HGET', KEYS[2], row[2])
  if e then
    out[#out + 1] = row[2]
    out[#out + 1] = e
    out[#out + 1] = call('HGET', KEYS[4], row[2]) or ''
    out[#out + 1] = row[3]
  end
end
return out
