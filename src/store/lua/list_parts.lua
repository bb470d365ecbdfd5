-- list_parts. KEYS: s, f, p, ev, evq. ARGV: now.
-- Reply: {'ok', {part_number, "<size>:<etag>", ...}} | {'fnf'} | gate reply.
local g = gate(NOW, false)
if g then return g end
if call('EXISTS', KEYS[2]) == 0 then return {'fnf'} end
return {'ok', call('HGETALL', KEYS[3])}
