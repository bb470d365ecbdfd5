-- upgate session-store prelude: prepended to every per-session script.
--
-- KEYS[1] is always the session hash `<prefix>:{<tenant>:<session>}:s`; every other key
-- of the session shares its hash tag, so a script only ever touches one cluster slot, and
-- every key a script touches is declared in KEYS, so Redis Cluster redirects (ASK,
-- TRYAGAIN) a script whose keys are mid-migration instead of running it on missing data.
-- Scripts call Redis through `call`, which the strict prelude (tests) replaces with one
-- that fails on any undeclared key. Arithmetic results are not turned back into strings
-- by `tostring` (Lua 5.1 would print 1.7e+12): values to store come precomputed in ARGV,
-- or, for small counters, are written with `string.format('%d', n)` (exact below 2^53).
local SKEY = KEYS[1]
local BASE = string.sub(SKEY, 1, -2)

-- Session-wide scripts get the `f:` key of every listed file (see `listed`) declared after
-- their fixed keys, from KEYS[first] on (with `with_parts`, the `p:` keys follow them),
-- their count in ARGV[2]. The caller read the ids just before; given the ids as this
-- script reads them, this returns the files with their `f:` and `p:` keys, or nil when the
-- list changed meanwhile (the caller reads it again).
local function declared_files(ids, first, with_parts)
  local n = tonumber(ARGV[2])
  if #ids ~= n then return nil end
  for i, fid in ipairs(ids) do
    if KEYS[first + i - 1] ~= BASE .. 'f:' .. fid then return nil end
    if with_parts and KEYS[first + n + i - 1] ~= BASE .. 'p:' .. fid then return nil end
  end
  local out = {}
  for i, fid in ipairs(ids) do
    out[i] = {id = fid, f = KEYS[first + i - 1], p = with_parts and KEYS[first + n + i - 1] or nil}
  end
  return out
end

-- The listed files (every file not deleted) of the order set `o_key` (file id scored by
-- registration sequence number): ids after the sequence number bound `after` ('-inf', or
-- '(<seq>'), at most `limit` of them (nil: all), and the cursor of the next page (the last
-- returned id's sequence number, '' when no file follows).
local function listed(o_key, after, limit)
  local r
  if limit then
    r = call('ZRANGEBYSCORE', o_key, after, '+inf', 'WITHSCORES', 'LIMIT', 0, limit + 1)
  else
    r = call('ZRANGEBYSCORE', o_key, after, '+inf', 'WITHSCORES')
  end
  local ids, scores = {}, {}
  for i = 1, #r, 2 do
    ids[#ids + 1] = r[i]
    scores[#scores + 1] = r[i + 1]
  end
  local cursor = ''
  if limit and #ids > limit then
    ids[#ids] = nil
    cursor = scores[limit]
  end
  return ids, cursor, scores
end

-- The records of `files` (declared_files) as HGETALL replies, the first `limit` of them.
local function records(files, limit)
  local out = {}
  for i, file in ipairs(files) do
    if i > limit then break end
    local f = call('HGETALL', file.f)
    if #f > 0 then out[#out + 1] = f end
  end
  return out
end

-- The queued cleanup entry of a file: "<upload id or empty>\n<object key>".
local function cleanup_entry(upload_id, object_key)
  return (upload_id or '') .. '\n' .. object_key
end

-- The queued cleanups of `c_key` as HGETALL returns them (file id, entry, ...). An entry of
-- the layout before (file id -> fileKey, no object key) cannot be done: it is dropped here,
-- so it never holds up a DELETE or the reaper (the bucket's lifecycle rule is left to it).
local function queued_cleanups(c_key)
  local all = call('HGETALL', c_key)
  local out = {}
  for i = 1, #all, 2 do
    if string.find(all[i + 1], '\n', 1, true) then
      out[#out + 1] = all[i]
      out[#out + 1] = all[i + 1]
    else
      call('HDEL', c_key, all[i])
    end
  end
  return out
end

-- Sets the retention deadline `ku` (the session's `keep_until`, ms) on keys this script wrote.
local function keep_until(ku, ...)
  if not ku then return end
  for _, key in ipairs({...}) do call('PEXPIREAT', key, ku) end
end

-- Sets the session's retention deadline on a key this script wrote.
local function keep(key)
  keep_until(call('HGET', SKEY, 'keep_until'), key)
end

-- Saturating decrement of the session's live-file count.
local function release_slot()
  local c = tonumber(call('HGET', SKEY, 'file_count'))
  if c and c > 0 then call('HINCRBY', SKEY, 'file_count', -1) end
end

-- Records event `etype` of the session, with copies of the session hash and (`fkey`) the
-- file hash as they are now, when the session has an outbox (its `wh` field, the outbox's
-- retention in ms, set at creation when the tenant had webhooks). The outbox keys are the
-- last two declared: `ev` (hash: `seq`, the last sequence number; sequence number -> the
-- event as JSON) and `evq` (sorted set: pending sequence numbers scored by when due, ms).
-- Every script that can record an event gets them after all its other keys. The event's
-- time is ARGV[1] (now, ms), kept as the string it came as.
local function record_event_kept(keep, etype, fkey)
  if not keep then return end
  local ev, evq = KEYS[#KEYS - 1], KEYS[#KEYS]
  if ev ~= BASE .. 'ev' or evq ~= BASE .. 'evq' then
    error('upgate: the outbox keys are not declared')
  end
  local seq = call('HINCRBY', ev, 'seq', 1)
  local e = {t = etype, at = ARGV[1], s = call('HGETALL', SKEY)}
  if fkey then
    local f = call('HGETALL', fkey)
    if #f > 0 then e.f = f end
  end
  call('HSET', ev, seq, cjson.encode(e))
  call('ZADD', evq, ARGV[1], seq)
  call('PEXPIRE', ev, keep)
  call('PEXPIRE', evq, keep)
end

-- `record_event_kept` with the session's `wh` field read here.
local function record_event(etype, fkey)
  record_event_kept(call('HGET', SKEY, 'wh'), etype, fkey)
end

-- The common gate. Returns nil when the session exists, is not past expiry and (when
-- asked) is active, plus the session fields {status, expires_at, ...} read in the same
-- HMGET (the extra field names given after `require_active`); otherwise the reply to
-- return as is:
--   {'snf'}                               no such session
--   {'exp', first(0|1), session-fields}   past expiresAt (first: this call flipped it)
--   {'na', status}                        not active
local function gate(now, require_active, ...)
  local st = call('HMGET', SKEY, 'status', 'expires_at', ...)
  if not st[1] then return {'snf'} end
  local exp = tonumber(st[2])
  if not exp then error('upgate: corrupt session (expires_at)') end
  if now >= exp * 1000 then
    local first = 0
    if st[1] == 'active' then
      call('HSET', SKEY, 'status', 'expired')
      record_event('session.expired')
      first = 1
    end
    return {'exp', first, call('HGETALL', SKEY)}
  end
  if require_active and st[1] ~= 'active' then return {'na', st[1]} end
  return nil, st
end

local NOW = tonumber(ARGV[1])
