-- finalize. KEYS: s, files, f:<id>... (every file, see declared_files).
-- ARGV: now, n, checked file id, ...
-- Reply: {'ok','incomplete', {file ids}} | {'ok','unchecked', {file ids}}
--      | {'ok','done', session, file-fields...} | {'stale'} | gate reply.
-- `checked` are the completed files whose content the caller verified; a live completed
-- file outside it was completed after the caller looked, and is refused until checked.
local files = declared_files(KEYS[2], 3, false)
if not files then return {'stale'} end
local g = gate(NOW, true)
if g then return g end
local checked = {}
for i = 3, #ARGV do checked[ARGV[i]] = true end
local incomplete, unchecked = {}, {}
for _, file in ipairs(files) do
  local fid = file.id
  local st = call('HMGET', file.f, 'status', 'id')
  if st[1] == 'registered' or st[1] == 'completing' then
    incomplete[#incomplete + 1] = st[2] or fid
  elseif st[1] == 'completed' and not checked[st[2] or fid] then
    unchecked[#unchecked + 1] = st[2] or fid
  end
end
if #incomplete > 0 then return {'ok', 'incomplete', incomplete} end
if #unchecked > 0 then return {'ok', 'unchecked', unchecked} end
call('HSET', SKEY, 'status', 'finalized')
local out = {'ok', 'done', call('HGETALL', SKEY)}
for _, file in ipairs(files) do
  local f = call('HGETALL', file.f)
  if #f > 0 then out[#out + 1] = f end
end
return out
