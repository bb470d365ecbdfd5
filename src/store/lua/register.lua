-- register_file. KEYS: s, keys, files, f. ARGV: now, file_key, file_id, field, value, ...
-- Reply: {'ok','created'} | {'ok','dup'} | {'ok','full', limit, count} | gate reply.
-- One HMGET reads the gate's fields, the count and the retention deadline.
local g, st = gate(NOW, true, 'file_limit', 'file_count', 'keep_until')
if g then return g end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return {'ok', 'dup'} end
local limit, count = tonumber(st[3]), tonumber(st[4])
if not limit or not count then error('upgate: corrupt session (file_limit/file_count)') end
if count >= limit then return {'ok', 'full', st[3], st[4]} end
redis.call('HINCRBY', SKEY, 'file_count', 1)
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
-- The file id is fresh (a new UUID), so its `f:` and `p:` keys cannot exist yet.
redis.call('HSET', KEYS[4], unpack(ARGV, 4))
-- `files` only grows (aborted files stay listed), so it needs its retention once, when the
-- first RPUSH creates it; `keys` can be emptied by aborts (and so deleted and recreated).
if redis.call('RPUSH', KEYS[3], ARGV[3]) == 1 then
  keep_until(st[5], KEYS[2], KEYS[3], KEYS[4])
else
  keep_until(st[5], KEYS[2], KEYS[4])
end
return {'ok', 'created'}
