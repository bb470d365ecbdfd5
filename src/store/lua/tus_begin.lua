-- tus_begin. KEYS: s, f, ev, evq. ARGV: now, token, lock_until (ms), offset.
-- Reply: {'ok','held', file-fields} | {'ok','locked'} | {'ok','offset', offset}
--      | {'ok','notopen', file-fields} | {'fnf'} | gate reply.
-- The lock (`tus_lock`, `tus_lock_until`) is taken, or renewed by its holder, only at the
-- offset the client sent, so of two PATCHes on one upload at most one proceeds. A file
-- never PATCHed has no `tus_off`: offset 0.
local g = gate(NOW, true)
if g then return g end
local st = call('HMGET', KEYS[2], 'status', 'tus_off', 'tus_lock', 'tus_lock_until')
if not st[1] then return {'fnf'} end
if st[1] ~= 'registered' then return {'ok', 'notopen', call('HGETALL', KEYS[2])} end
if st[3] and st[3] ~= ARGV[2] and tonumber(st[4]) > NOW then return {'ok', 'locked'} end
local off = st[2] or '0'
if off ~= ARGV[4] then return {'ok', 'offset', off} end
call('HSET', KEYS[2], 'tus_lock', ARGV[2], 'tus_lock_until', ARGV[3])
return {'ok', 'held', call('HGETALL', KEYS[2])}
