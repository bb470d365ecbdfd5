-- create_session. KEYS: s, keys, files, c. ARGV: _, keep_until, field, value, ...
-- Replaces any previous state under the same id (as the memory store does).
for _, fid in ipairs(redis.call('LRANGE', KEYS[3], 0, -1)) do
  redis.call('DEL', fkey(fid), pkey(fid))
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('HSET', SKEY, 'keep_until', ARGV[2], unpack(ARGV, 3))
redis.call('PEXPIREAT', SKEY, ARGV[2])
return 'ok'
