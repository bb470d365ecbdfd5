-- finalize. KEYS: s, files. ARGV: now, checked file id, ...
-- Reply: {'ok','incomplete', {file ids}} | {'ok','unchecked', {file ids}}
--      | {'ok','done', session, file-fields...} | gate reply.
-- `checked` are the completed files whose content the caller verified; a live completed
-- file outside it was completed after the caller looked, and is refused until checked.
local g = gate(NOW, true)
if g then return g end
local checked = {}
for i = 2, #ARGV do checked[ARGV[i]] = true end
local ids = redis.call('LRANGE', KEYS[2], 0, -1)
local incomplete, unchecked = {}, {}
for _, fid in ipairs(ids) do
  local st = redis.call('HMGET', fkey(fid), 'status', 'id')
  if st[1] == 'registered' or st[1] == 'completing' then
    incomplete[#incomplete + 1] = st[2] or fid
  elseif st[1] == 'completed' and not checked[st[2] or fid] then
    unchecked[#unchecked + 1] = st[2] or fid
  end
end
if #incomplete > 0 then return {'ok', 'incomplete', incomplete} end
if #unchecked > 0 then return {'ok', 'unchecked', unchecked} end
redis.call('HSET', SKEY, 'status', 'finalized')
local out = {'ok', 'done', redis.call('HGETALL', SKEY)}
for _, fid in ipairs(ids) do
  local f = redis.call('HGETALL', fkey(fid))
  if #f > 0 then out[#out + 1] = f end
end
return out
