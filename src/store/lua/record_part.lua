-- record_part. KEYS: s, f, p, ev, evq. ARGV: now, part_number, "<size>:<etag>".
-- Reply: {'ok', file-fields} | {'fnf'} | gate reply. The part is stored only while the
-- file is `registered`.
local g = gate(NOW, true)
if g then return g end
local f = call('HGETALL', KEYS[2])
if #f == 0 then return {'fnf'} end
if call('HGET', KEYS[2], 'status') == 'registered' then
  call('HSET', KEYS[3], ARGV[2], ARGV[3])
  keep(KEYS[3])
end
return {'ok', f}
