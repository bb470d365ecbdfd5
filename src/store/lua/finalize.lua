-- finalize. KEYS: s, o, f:<id>... (every listed file, see declared_files), ev, evq.
-- ARGV: now, n, embed (files in the reply), checked file id, ...
-- Reply: {'ok','incomplete', {file ids}} | {'ok','unchecked', {file ids}}
--      | {'ok','done', session, next cursor ('' if none), {file-fields...}} | {'stale'}
--      | gate reply.
-- `checked` are the completed files whose content the caller verified; a live completed
-- file outside it was completed after the caller looked, and is refused until checked.
local ids, _, scores = listed(KEYS[2], '-inf')
local files = declared_files(ids, 3, false)
if not files then return {'stale'} end
local g = gate(NOW, true)
if g then return g end
local checked = {}
for i = 4, #ARGV do checked[ARGV[i]] = true end
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
record_event('session.finalized')
local embed = tonumber(ARGV[3])
local cursor = ''
if #files > embed then cursor = scores[embed] end
return {'ok', 'done', call('HGETALL', SKEY), cursor, records(files, embed)}
