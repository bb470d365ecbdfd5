-- retry_event (no gate). KEYS: s, ev, evq, evs, evd. ARGV: now, seq.
-- Reply: 1 when the dead-lettered event is pending again (due now, its retry window
-- starting now), else 0. The state's fourth line is the window's start (events::Delivery).
if not call('ZSCORE', KEYS[5], ARGV[2]) then return 0 end
if call('HEXISTS', KEYS[2], ARGV[2]) == 0 then
  call('ZREM', KEYS[5], ARGV[2])
  return 0
end
local lines = {}
for line in string.gmatch((call('HGET', KEYS[4], ARGV[2]) or '') .. '\n', '([^\n]*)\n') do
  lines[#lines + 1] = line
end
while #lines < 5 do lines[#lines + 1] = '' end
lines[4] = ARGV[1]
call('HSET', KEYS[4], ARGV[2], table.concat(lines, '\n', 1, 5))
call('ZREM', KEYS[5], ARGV[2])
call('ZADD', KEYS[3], ARGV[1], ARGV[2])
local ttl = call('PTTL', KEYS[2])
if ttl > 0 then call('PEXPIRE', KEYS[3], ttl) end
return 1
