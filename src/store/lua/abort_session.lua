-- abort_session. KEYS: s, keys, o, c, f:<id>..., p:<id>... (every listed file, see
-- declared_files), ev, evq. ARGV: now, n.
-- Reply: {'ok','aborted', {file id, cleanup entry, ...}} | {'ok','forgot'}
--      | {'ok','pending', {file id, cleanup entry, ...}} | {'ok','busy'} | {'stale'}
--      | gate reply.
-- Every live file is aborted (completed ones too: their objects are deleted) and queued
-- for cleanup as in abort_file; nothing changes while a file's completion is in flight. A
-- finalized session is forgotten: every key removed, its objects left to the application;
-- but not while cleanups of files deleted before finalize are queued (`pending`: the
-- caller does them and asks again), since forgetting would drop the queue.
local files = declared_files((listed(KEYS[3], '-inf')), 5, true)
if not files then return {'stale'} end
local g = gate(NOW, false)
if g then return g end
local ss = call('HGET', SKEY, 'status')
if ss == 'finalized' then
  local pending = queued_cleanups(KEYS[4])
  if #pending > 0 then return {'ok', 'pending', pending} end
  record_event('session.deleted')
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
    local st = call('HMGET', fk, 'status', 'upload_id', 'file_key', 'object_key')
    if st[1] == 'registered' or st[1] == 'completing' or st[1] == 'completed' then
      call('HSET', fk, 'status', 'aborted')
      call('HDEL', fk, 'lease_token', 'lease_until')
      if st[2] or st[1] == 'completed' then
        if not st[4] then error('upgate: corrupt file (object_key)') end
        call('HSET', KEYS[4], fid, cleanup_entry(st[2], st[4]))
        queued = true
      end
      if st[3] then call('HDEL', KEYS[2], st[3]) end
      release_slot()
    end
  end
  if queued then keep(KEYS[4]) end
  record_event('session.deleted')
end
return {'ok', 'aborted', queued_cleanups(KEYS[4])}
