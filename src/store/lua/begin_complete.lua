-- begin_complete. KEYS: s, f, p, ev, evq. ARGV: now, token, lease_until (ms, precomputed).
-- Reply: {'ok','done', file} | {'ok','aborted'} | {'ok','busy'}
--      | {'ok','acquired', file, parts} | {'fnf'} | gate reply.
local g = gate(NOW, false)
if g then return g end
local st = call('HMGET', KEYS[2], 'status', 'lease_until')
if not st[1] then return {'fnf'} end
if st[1] == 'completed' then return {'ok', 'done', call('HGETALL', KEYS[2])} end
if st[1] == 'aborted' then return {'ok', 'aborted'} end
local ss = call('HGET', SKEY, 'status')
if ss ~= 'active' then return {'na', ss} end
if st[1] == 'completing' and st[2] then
  local until_ms = tonumber(st[2])
  if until_ms and until_ms > NOW then return {'ok', 'busy'} end
end
call('HSET', KEYS[2], 'status', 'completing', 'lease_token', ARGV[2], 'lease_until', ARGV[3])
return {'ok', 'acquired', call('HGETALL', KEYS[2]), call('HGETALL', KEYS[3])}
