-- abort_file. KEYS: s, keys, f, c. ARGV: now, file_id.
-- Reply: {'ok','aborted', file-fields as before the call, cleanup(0|1)} | {'ok','busy'}
--      | {'fnf'} | gate reply.
-- A file with storage state (an upload id, or completed) is queued in `c` (file id →
-- fileKey) until cleanup_done. Its fileKey is free at once: object keys carry the file id,
-- so the cleanup can never touch a file registered later under the same fileKey.
local g = gate(NOW, true)
if g then return g end
local f = call('HGETALL', KEYS[3])
if #f == 0 then return {'fnf'} end
local st = call('HMGET', KEYS[3], 'status', 'file_key', 'upload_id', 'lease_until')
if st[1] == 'completing' then
  local lease = tonumber(st[4])
  if lease and lease > NOW then return {'ok', 'busy'} end
end
if st[1] == 'aborted' then
  return {'ok', 'aborted', f, call('HEXISTS', KEYS[4], ARGV[2])}
end
call('HSET', KEYS[3], 'status', 'aborted')
call('HDEL', KEYS[3], 'lease_token', 'lease_until')
local cleanup = 0
if st[3] or st[1] == 'completed' then
  cleanup = 1
  call('HSET', KEYS[4], ARGV[2], st[2] or '')
  keep(KEYS[4])
end
if st[2] then call('HDEL', KEYS[2], st[2]) end
release_slot()
return {'ok', 'aborted', f, cleanup}
