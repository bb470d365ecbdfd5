-- set_upload_id. KEYS: s, f, ev, evq. ARGV: now, upload_id.
-- Reply: {'ok','stored'} | {'ok','existing', id} | {'ok','notopen', file-fields} | {'fnf'} | gate.
local g = gate(NOW, true)
if g then return g end
local st = call('HMGET', KEYS[2], 'status', 'upload_id')
if not st[1] then return {'fnf'} end
if st[1] ~= 'registered' and st[1] ~= 'completing' then return {'ok', 'notopen', call('HGETALL', KEYS[2])} end
if st[2] then return {'ok', 'existing', st[2]} end
call('HSET', KEYS[2], 'upload_id', ARGV[2])
return {'ok', 'stored'}
