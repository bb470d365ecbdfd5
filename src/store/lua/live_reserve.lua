-- live_reserve: runs on the tenant's live-session set alone (no session prelude).
-- KEYS: live set `<prefix>:{<tenant>}:live`. ARGV: now, session_id, expires_at (ms), limit.
-- Drops sessions past their expiry, then counts `session_id` among the live ones (score =
-- its expiry) if fewer than `limit` are live. Reply: 1 counted (or already), 0 refused.
call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if call('ZSCORE', KEYS[1], ARGV[2]) then return 1 end
if call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
call('ZADD', KEYS[1], ARGV[3], ARGV[2])
-- The set lives as long as its longest-lived member (scores are whole milliseconds).
local top = call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
call('PEXPIREAT', KEYS[1], top[2])
return 1
