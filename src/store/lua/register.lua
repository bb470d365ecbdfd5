-- register_file. KEYS: s, keys, files, f. ARGV: now, file_key, file_id, field, value, ...
-- Reply: {'ok','created'} | {'ok','dup'} | {'ok','full', limit, count} | gate reply.
local g = gate(NOW, true)
if g then return g end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return {'ok', 'dup'} end
local lc = redis.call('HMGET', SKEY, 'file_limit', 'file_count')
local limit, count = tonumber(lc[1]), tonumber(lc[2])
if not limit or not count then error('upgate: corrupt session (file_limit/file_count)') end
if count >= limit then return {'ok', 'full', lc[1], lc[2]} end
redis.call('HINCRBY', SKEY, 'file_count', 1)
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('RPUSH', KEYS[3], ARGV[3])
redis.call('DEL', KEYS[4], pkey(ARGV[3]))
redis.call('HSET', KEYS[4], unpack(ARGV, 4))
keep(KEYS[2])
keep(KEYS[3])
keep(KEYS[4])
return {'ok', 'created'}
