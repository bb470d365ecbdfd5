-- event_attempted (no gate). KEYS: s, ev, evq, evs, evd.
-- ARGV: now, seq, delivery state, outcome ('done' | 'dead' | due ms).
-- Reply: 1 when the event was pending (and is updated), else 0. A delivered event leaves
-- the outbox; a dead-lettered one moves to `evd` (scored by when, ms). `evs` and `evd`
-- live as long as `ev`.
if not call('ZSCORE', KEYS[3], ARGV[2]) then return 0 end
if ARGV[4] == 'done' then
  call('ZREM', KEYS[3], ARGV[2])
  call('HDEL', KEYS[2], ARGV[2])
  call('HDEL', KEYS[4], ARGV[2])
  return 1
end
call('HSET', KEYS[4], ARGV[2], ARGV[3])
if ARGV[4] == 'dead' then
  call('ZREM', KEYS[3], ARGV[2])
  call('ZADD', KEYS[5], ARGV[1], ARGV[2])
else
  call('ZADD', KEYS[3], 'XX', ARGV[4], ARGV[2])
end
local ttl = call('PTTL', KEYS[2])
if ttl > 0 then
  call('PEXPIRE', KEYS[4], ttl)
  call('PEXPIRE', KEYS[5], ttl)
end
return 1
