-- reap. KEYS: s, o, c, f:<id>... (every listed file, see declared_files), ev, evq.
-- ARGV: now, n.
-- Reply: {'none'} | {'stale'}
--      | {'ok', first(0|1), session-fields, busy_until ('' or ms), {open-file-fields...},
--         {file id, cleanup entry, ...}}.
-- Past expiry, open uploads are those of live files (registered, or completing under a
-- lease that ran out) with an upload id; a completion still in flight is left alone and
-- reported in busy_until. Queued cleanups (deleted files) are reported whatever the time.
local files = declared_files((listed(KEYS[2], '-inf')), 4, false)
if not files then return {'stale'} end
local st = call('HMGET', SKEY, 'status', 'expires_at')
if not st[1] then return {'none'} end
local exp = tonumber(st[2])
if not exp then error('upgate: corrupt session (expires_at)') end
local past = NOW >= exp * 1000
local first = 0
if past and st[1] == 'active' then
  call('HSET', SKEY, 'status', 'expired')
  record_event('session.expired')
  first = 1
end
local open, busy, busy_ms = {}, '', nil
if past then
  for _, file in ipairs(files) do
    local fk = file.f
    local fs = call('HMGET', fk, 'status', 'upload_id', 'lease_until')
    local lease = tonumber(fs[3])
    if fs[1] == 'completing' and lease and lease > NOW then
      if not busy_ms or lease < busy_ms then busy, busy_ms = fs[3], lease end
    elseif (fs[1] == 'registered' or fs[1] == 'completing') and fs[2] then
      open[#open + 1] = call('HGETALL', fk)
    end
  end
end
return {'ok', first, call('HGETALL', SKEY), busy, open, queued_cleanups(KEYS[3])}
