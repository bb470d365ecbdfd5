-- abort_file. KEYS: s, keys, f. ARGV: now.
-- Reply: {'ok', file-fields as before the call} | {'fnf'} | gate reply.
local g = gate(NOW, true)
if g then return g end
local f = redis.call('HGETALL', KEYS[3])
if #f == 0 then return {'fnf'} end
local st = redis.call('HMGET', KEYS[3], 'status', 'file_key')
if st[1] ~= 'aborted' then
  redis.call('HSET', KEYS[3], 'status', 'aborted')
  redis.call('HDEL', KEYS[3], 'lease_token', 'lease_until')
  if st[2] then redis.call('HDEL', KEYS[2], st[2]) end
  release_slot()
end
return {'ok', f}
