-- abort_file (a file DELETE). KEYS: s, keys, f, c, p, o, t, ev, evq. ARGV: now, file_id.
-- Reply: {'ok','deleted', cleanup entry ('' for none)} | {'ok','busy'} | {'fnf'} | gate reply.
-- The file's record, parts, tus tail and `o` entry are removed: a deleted file costs nothing once
-- its cleanup is done. A file with storage state (an upload id, or completed) is queued in
-- `c` (file id -> cleanup_entry) until cleanup_done; a file already deleted whose cleanup is
-- still queued answers `deleted` again with it. Its fileKey is free at once: object keys
-- carry the file id, so the cleanup can never touch a file registered later under the
-- same fileKey.
local g = gate(NOW, true)
if g then return g end
local st = call('HMGET', KEYS[3], 'status', 'file_key', 'upload_id', 'lease_until', 'object_key')
if not st[1] then
  local queued = call('HGET', KEYS[4], ARGV[2])
  if queued and string.find(queued, '\n', 1, true) then return {'ok', 'deleted', queued} end
  if queued then call('HDEL', KEYS[4], ARGV[2]) end -- older layout: see queued_cleanups
  return {'fnf'}
end
if st[1] == 'completing' then
  local lease = tonumber(st[4])
  if lease and lease > NOW then return {'ok', 'busy'} end
end
-- The gate required an active session, and only a session DELETE marks files `aborted`
-- (the session with them), so the file is live here.
local entry = ''
if st[3] or st[1] == 'completed' then
  if not st[5] then error('upgate: corrupt file (object_key)') end
  entry = cleanup_entry(st[3], st[5])
  call('HSET', KEYS[4], ARGV[2], entry)
  keep(KEYS[4])
end
if st[2] then call('HDEL', KEYS[2], st[2]) end
release_slot()
-- The event's copy of the file is taken before its record goes (it shows `aborted`).
record_event('file.deleted', KEYS[3])
call('DEL', KEYS[3], KEYS[5], KEYS[7])
call('ZREM', KEYS[6], ARGV[2])
return {'ok', 'deleted', entry}
