-- tus_advance. KEYS: s, f, p, t, ev, evq. ARGV: now, token, lock_until (ms), from, to,
-- tail_len (before), tail op ('keep'|'append'|'set'), tail bytes, size ('' unless the
-- length became known), part_count, then part_number, "<size>:<etag>", ... for the parts.
-- Reply: {'ok','done'} | {'ok','lost'} | {'ok','notopen', file-fields} | {'fnf'} | gate reply.
-- Parts, tail and offset change together, for the lock's holder only and only from the
-- offset and tail it read: the offset never moves back and never runs ahead of the bytes
-- kept. The tail (`t`, a string) holds the bytes past the last whole part.
local g = gate(NOW, true)
if g then return g end
local st = call('HMGET', KEYS[2], 'status', 'tus_off', 'tus_lock')
if not st[1] then return {'fnf'} end
if st[1] ~= 'registered' then return {'ok', 'notopen', call('HGETALL', KEYS[2])} end
if st[3] ~= ARGV[2] or (st[2] or '0') ~= ARGV[4] then return {'ok', 'lost'} end
if call('STRLEN', KEYS[4]) ~= tonumber(ARGV[6]) then return {'ok', 'lost'} end
for i = 11, #ARGV, 2 do
  call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
end
if #ARGV >= 11 then keep(KEYS[3]) end
if ARGV[7] == 'append' and ARGV[8] ~= '' then
  call('APPEND', KEYS[4], ARGV[8])
  keep(KEYS[4])
elseif ARGV[7] == 'set' then
  if ARGV[8] == '' then
    call('DEL', KEYS[4])
  else
    call('SET', KEYS[4], ARGV[8])
    keep(KEYS[4])
  end
end
if ARGV[9] ~= '' then
  call('HSET', KEYS[2], 'size_bytes', ARGV[9], 'part_count', ARGV[10])
  call('HDEL', KEYS[2], 'tus_defer')
end
call('HSET', KEYS[2], 'tus_off', ARGV[5], 'tus_lock_until', ARGV[3])
return {'ok', 'done'}
