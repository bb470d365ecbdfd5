-- get_session. KEYS: s, files, f:<id>... (every file, see declared_files). ARGV: now, n.
-- Reply: {'ok', session-fields, file-fields...} (files in registration order)
--      | {'stale'} | gate reply.
local files = declared_files(KEYS[2], 3, false)
if not files then return {'stale'} end
local g = gate(NOW, false)
if g then return g end
local out = {'ok', call('HGETALL', SKEY)}
for _, file in ipairs(files) do
  local f = call('HGETALL', file.f)
  if #f > 0 then out[#out + 1] = f end
end
return out
