-- abort_session. KEYS: s, keys, files, c. ARGV: now.
-- Reply: {'ok','aborted', queued-file-fields...} | {'ok','forgot'} | {'ok','busy'}
--      | gate reply.
-- Every live file is aborted (completed ones too: their objects are deleted) and queued
-- for cleanup as in abort_file; nothing changes while a file's completion is in flight. A
-- finalized session is forgotten: every key removed, its objects left to the application.
local g = gate(NOW, false)
if g then return g end
local ss = redis.call('HGET', SKEY, 'status')
local ids = redis.call('LRANGE', KEYS[3], 0, -1)
if ss == 'finalized' then
  for _, fid in ipairs(ids) do redis.call('DEL', fkey(fid), pkey(fid)) end
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
  return {'ok', 'forgot'}
end
if ss ~= 'aborted' then
  for _, fid in ipairs(ids) do
    local st = redis.call('HMGET', fkey(fid), 'status', 'lease_until')
    if st[1] == 'completing' then
      local lease = tonumber(st[2])
      if lease and lease > NOW then return {'ok', 'busy'} end
    end
  end
  redis.call('HSET', SKEY, 'status', 'aborted')
  local queued = false
  for _, fid in ipairs(ids) do
    local fk = fkey(fid)
    local st = redis.call('HMGET', fk, 'status', 'upload_id', 'file_key')
    if st[1] == 'registered' or st[1] == 'completing' or st[1] == 'completed' then
      redis.call('HSET', fk, 'status', 'aborted')
      redis.call('HDEL', fk, 'lease_token', 'lease_until')
      if st[2] or st[1] == 'completed' then
        redis.call('HSET', KEYS[4], fid, st[3] or '')
        queued = true
        if st[3] then redis.call('HSET', KEYS[2], st[3], '~' .. fid) end
      elseif st[3] then
        redis.call('HDEL', KEYS[2], st[3])
      end
      release_slot()
    end
  end
  if queued then keep(KEYS[4]) end
end
local out = {'ok', 'aborted'}
for _, fid in ipairs(redis.call('HKEYS', KEYS[4])) do
  local f = redis.call('HGETALL', fkey(fid))
  if #f > 0 then out[#out + 1] = f end
end
return out
