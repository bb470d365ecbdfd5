-- claim_expired: runs on the reaper index alone (no session prelude).
-- KEYS: reap index. ARGV: now, lease_until (ms, precomputed), limit (>= 1).
-- Takes up to `limit` members due at `now` (oldest first) and re-scores them to the lease
-- end, so no other caller gets them until then. Reply: the claimed members.
local due = call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, m in ipairs(due) do
  call('ZADD', KEYS[1], 'XX', ARGV[2], m)
end
return due
