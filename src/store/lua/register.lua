-- register_file. KEYS: s, keys, o, f, ev, evq.
-- ARGV: now, file_key, file_id, size_bytes, part_size_bytes, "\n<content type>\n",
--       "\n<type>/*\n" (both empty without a content type), field, value, ...
-- Reply: {'ok','created', session expires_at} | {'ok','dup'} | {'ok','full', limit, count}
--      | {'ok','ps', session part_size_bytes} | {'ok','big', max_file_size}
--      | {'ok','type', allowed_types} | gate reply.
-- One HMGET reads the gate's fields, the count, the retention deadline, the session's
-- part size, the end user's file limits the session was created with, the outbox's
-- retention (`record_event_kept`) and the registration sequence number: every session
-- field this script needs, so the common path makes six calls (measured: benches/README.md,
-- "Registration script").
local g, st = gate(NOW, true, 'file_limit', 'file_count', 'keep_until', 'part_size_bytes',
  'max_file_size', 'allowed_types', 'wh', 'file_seq', 'ordered')
if g then return g end
-- The session's own file limits (set when an end user's token created it) hold for every
-- credential. `allowed_types` is one type per line between newlines.
if st[7] and tonumber(ARGV[4]) > tonumber(st[7]) then return {'ok', 'big', st[7]} end
if st[8] then
  local plain = ARGV[6] ~= '' and (string.find(st[8], ARGV[6], 1, true)
    or string.find(st[8], ARGV[7], 1, true))
  if not plain then return {'ok', 'type', st[8]} end
end
-- A file's part size derives from its session's (fixed at creation), whatever the calling
-- replica is configured with: the session's part size raised to the smallest whole MiB
-- that keeps the file within 10,000 parts. The caller computed it from what it assumed;
-- if that differs, it is told the session's and registers again (only compared here: the
-- numbers stored come from ARGV, see the prelude).
local session_ps, size, ps = tonumber(st[6]), tonumber(ARGV[4]), tonumber(ARGV[5])
if session_ps then
  local want = session_ps
  local needed = math.ceil(size / 10000)
  if needed > session_ps then want = math.ceil(needed / 1048576) * 1048576 end
  if want ~= ps then return {'ok', 'ps', st[6]} end
end
local limit, count = tonumber(st[3]), tonumber(st[4])
if not limit or not count then error('upgate: corrupt session (file_limit/file_count)') end
-- A taken fileKey is reported before a full session (both are refusals; `dup` is the more
-- specific one). On the common path one HSETNX both checks and claims the key.
if count >= limit then
  if call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return {'ok', 'dup'} end
  return {'ok', 'full', st[3], st[4]}
end
if call('HSETNX', KEYS[2], ARGV[2], ARGV[3]) == 0 then return {'ok', 'dup'} end
-- Both counters in one HSET, written as whole numbers (`%d`, never Lua's `%.14g`).
local seq = (tonumber(st[10]) or 0) + 1
call('HSET', SKEY, 'file_count', string.format('%d', count + 1),
  'file_seq', string.format('%d', seq))
-- The file id is fresh (a new UUID), so its `f:` and `p:` keys cannot exist yet.
call('HSET', KEYS[4], unpack(ARGV, 8))
call('ZADD', KEYS[3], seq, ARGV[3])
-- Retention: the file hash is new. `keys` and `o` hold one entry per live file while the
-- session is active (this script adds one to each as it counts the file; abort_file removes
-- them with each release_slot), so they were just created exactly when the count was 0;
-- they can be emptied by deletions, deleted by Redis, and created again later, which the
-- same test catches. A session an older build created (no `ordered` field) kept its files
-- in a list, so its `o` can be new whatever the count: then ZCARD (O(1)) tells.
if count == 0 then
  keep_until(st[5], KEYS[2], KEYS[3], KEYS[4])
elseif not st[11] and call('ZCARD', KEYS[3]) == 1 then
  keep_until(st[5], KEYS[3], KEYS[4])
else
  keep_until(st[5], KEYS[4])
end
record_event_kept(st[9], 'file.registered', KEYS[4])
return {'ok', 'created', st[2]}
