-- get_session. KEYS: s, o, f:<id>... (the page's files, see declared_files), ev, evq.
-- ARGV: now, n, after ('-inf' | '(<seq>'), limit.
-- Reply: {'ok', session-fields, next cursor ('' on the last page), {file-fields...}}
--      | {'stale'} | gate reply.
local ids, cursor = listed(KEYS[2], ARGV[3], tonumber(ARGV[4]))
local files = declared_files(ids, 3, false)
if not files then return {'stale'} end
local g = gate(NOW, false)
if g then return g end
return {'ok', call('HGETALL', SKEY), cursor, records(files, #files)}
