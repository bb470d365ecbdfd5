-- reap. KEYS: s, files. ARGV: now.
-- Reply: {'none'} | {'ok', first(0|1), session-fields, open-file-fields...}.
local st = redis.call('HMGET', SKEY, 'status', 'expires_at')
if not st[1] then return {'none'} end
local exp = tonumber(st[2])
if not exp then error('upgate: corrupt session (expires_at)') end
local past = NOW >= exp * 1000
local first = 0
if past and st[1] == 'active' then
  redis.call('HSET', SKEY, 'status', 'expired')
  first = 1
end
local out = {'ok', first, redis.call('HGETALL', SKEY)}
if past then
  for _, fid in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
    local fk = fkey(fid)
    local fs = redis.call('HMGET', fk, 'status', 'upload_id')
    if (fs[1] == 'registered' or fs[1] == 'completing') and fs[2] then
      out[#out + 1] = redis.call('HGETALL', fk)
    end
  end
end
return out
