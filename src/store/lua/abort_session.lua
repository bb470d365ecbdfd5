-- abort_session. KEYS: s, keys, files. ARGV: now.
-- Reply: {'ok', open-file-fields...} | gate reply ({'na','finalized'} when finalized).
local g = gate(NOW, false)
if g then return g end
local ss = redis.call('HGET', SKEY, 'status')
if ss == 'finalized' then return {'na', 'finalized'} end
if ss == 'aborted' then return {'ok'} end
redis.call('HSET', SKEY, 'status', 'aborted')
local out = {'ok'}
for _, fid in ipairs(redis.call('LRANGE', KEYS[3], 0, -1)) do
  local fk = fkey(fid)
  local st = redis.call('HMGET', fk, 'status', 'upload_id', 'file_key')
  if st[1] == 'registered' or st[1] == 'completing' then
    if st[2] then out[#out + 1] = redis.call('HGETALL', fk) end
    redis.call('HSET', fk, 'status', 'aborted')
    redis.call('HDEL', fk, 'lease_token', 'lease_until')
    if st[3] then redis.call('HDEL', KEYS[2], st[3]) end
    release_slot()
  end
end
return out
