-- upgate session-store prelude: prepended to every per-session script.
--
-- KEYS[1] is always the session hash `<prefix>:{<tenant>:<session>}:s`; every other key
-- of the session shares its hash tag and is derived from BASE, so a script only ever
-- touches one cluster slot. Arithmetic results are never turned back into strings here
-- (Lua 5.1 would print 1.7e+12): values to store come precomputed in ARGV.
local SKEY = KEYS[1]
local BASE = string.sub(SKEY, 1, -2)

local function fkey(fid) return BASE .. 'f:' .. fid end
local function pkey(fid) return BASE .. 'p:' .. fid end

-- Sets the retention deadline `ku` (the session's `keep_until`, ms) on keys this script wrote.
local function keep_until(ku, ...)
  if not ku then return end
  for _, key in ipairs({...}) do redis.call('PEXPIREAT', key, ku) end
end

-- Sets the session's retention deadline on a key this script wrote.
local function keep(key)
  keep_until(redis.call('HGET', SKEY, 'keep_until'), key)
end

-- Saturating decrement of the session's live-file count.
local function release_slot()
  local c = tonumber(redis.call('HGET', SKEY, 'file_count'))
  if c and c > 0 then redis.call('HINCRBY', SKEY, 'file_count', -1) end
end

-- The common gate. Returns nil when the session exists, is not past expiry and (when
-- asked) is active, plus the session fields {status, expires_at, ...} read in the same
-- HMGET (the extra field names given after `require_active`); otherwise the reply to
-- return as is:
--   {'snf'}                               no such session
--   {'exp', first(0|1), session-fields}   past expiresAt (first: this call flipped it)
--   {'na', status}                        not active
local function gate(now, require_active, ...)
  local st = redis.call('HMGET', SKEY, 'status', 'expires_at', ...)
  if not st[1] then return {'snf'} end
  local exp = tonumber(st[2])
  if not exp then error('upgate: corrupt session (expires_at)') end
  if now >= exp * 1000 then
    local first = 0
    if st[1] == 'active' then
      redis.call('HSET', SKEY, 'status', 'expired')
      first = 1
    end
    return {'exp', first, redis.call('HGETALL', SKEY)}
  end
  if require_active and st[1] ~= 'active' then return {'na', st[1]} end
  return nil, st
end

local NOW = tonumber(ARGV[1])
