-- finalize. KEYS: s, files. ARGV: now.
-- Reply: {'ok','incomplete', {file ids}} | {'ok','done', session, file-fields...} | gate reply.
local g = gate(NOW, true)
if g then return g end
local ids = redis.call('LRANGE', KEYS[2], 0, -1)
local incomplete = {}
for _, fid in ipairs(ids) do
  local st = redis.call('HMGET', fkey(fid), 'status', 'id')
  if st[1] == 'registered' or st[1] == 'completing' then incomplete[#incomplete + 1] = st[2] or fid end
end
if #incomplete > 0 then return {'ok', 'incomplete', incomplete} end
redis.call('HSET', SKEY, 'status', 'finalized')
local out = {'ok', 'done', redis.call('HGETALL', SKEY)}
for _, fid in ipairs(ids) do
  local f = redis.call('HGETALL', fkey(fid))
  if #f > 0 then out[#out + 1] = f end
end
return out
