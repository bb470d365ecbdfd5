-- get_session. KEYS: s, files. ARGV: now.
-- Reply: {'ok', session-fields, file-fields...} (files in registration order).
local g = gate(NOW, false)
if g then return g end
local out = {'ok', redis.call('HGETALL', SKEY)}
for _, fid in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  local f = redis.call('HGETALL', fkey(fid))
  if #f > 0 then out[#out + 1] = f end
end
return out
