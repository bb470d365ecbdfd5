-- get_file. KEYS: s, f, ev, evq. ARGV: now, require_active ('1'|'0').
-- Reply: {'ok', file-fields} | {'fnf'} | gate reply.
local g = gate(NOW, ARGV[2] == '1')
if g then return g end
local f = call('HGETALL', KEYS[2])
if #f == 0 then return {'fnf'} end
return {'ok', f}
