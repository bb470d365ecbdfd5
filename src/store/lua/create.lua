-- create_session. KEYS: s, keys, o, c, ev, evq. ARGV: now, keep_until, field, value, ...
-- Replaces any previous state under the same id (as the memory store does): the session's
-- own keys are deleted; file hashes of a previous session under the same id are no longer
-- listed and run out with their retention deadline (ids are fresh UUIDs, so this only
-- happens in tests).
call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
-- `ordered`: every live file of this session is in its order set `o` (register.lua).
call('HSET', SKEY, 'keep_until', ARGV[2], 'ordered', '1', unpack(ARGV, 3))
call('PEXPIREAT', SKEY, ARGV[2])
record_event('session.created')
return 'ok'
