-- abort_session. KEYS: s, keys, files, c, f:<id>..., p:<id>... (every file, see
-- declared_files). ARGV: now, n.
-- Reply: {'ok','aborted', queued-file-fields...} | {'ok','forgot'}
--      | {'ok','pending', queued-file-fields...} | {'ok','busy'} | {'stale'} | gate reply.
-- Every live file is aborted (completed ones too: their objects are deleted) and queued
-- for cleanup as in abort_file; nothing changes while a file's completion is in flight. A
-- finalized session is forgotten: every key removed, its objects left to the application;
-- but not while cleanups of files deleted before finalize are queued (`pending`: the
-- caller does them and asks again), since forgetting would drop the queue.
local files = declared_files(KEYS[3], 5, true)
if not files then return {'stale'} end
local g = gate(NOW, false)
if g then return g end
local ss = call('HGET', SKEY, 'status')
local function queued(out) return queued_files(KEYS[4], files, out) end
if ss == 'finalized' then
  local pending = queued({'ok', 'pending'})
  if #pending > 2 then return pending end
  for _, file in ipairs(files) do call('DEL', file.f, file.p) end
  call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
  return {'ok', 'forgot'}
end
if ss ~= 'aborted' then
  for _, file in ipairs(files) do
    local st = call('HMGET', file.f, 'status', 'lease_until')
    if st[1] == 'completing' then
      local lease = tonumber(st[2])
      if lease and lease > NOW then return {'ok', 'busy'} end
    end
  end
  call('HSET', SKEY, 'status', 'aborted')
  local queued = false
  for _, file in ipairs(files) do
    local fid, fk = file.id, file.f
    local st = call('HMGET', fk, 'status', 'upload_id', 'file_key')
    if st[1] == 'registered' or st[1] == 'completing' or st[1] == 'completed' then
      call('HSET', fk, 'status', 'aborted')
      call('HDEL', fk, 'lease_token', 'lease_until')
      if st[2] or st[1] == 'completed' then
        call('HSET', KEYS[4], fid, st[3] or '')
        queued = true
      end
      if st[3] then call('HDEL', KEYS[2], st[3]) end
      release_slot()
    end
  end
  if queued then keep(KEYS[4]) end
end
return queued({'ok', 'aborted'})
