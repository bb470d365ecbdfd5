-- reap_done: runs on the reaper index alone (no session prelude).
-- KEYS: reap index. ARGV: member, claimed_until (the claim's score), next ('' = remove).
-- Ends a claim: only while the entry still carries the claim's score, so a schedule_reap
-- that moved it meanwhile (a cleanup that could not be done at once) is kept.
local score = call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then return 0 end
if ARGV[3] == '' then
  call('ZREM', KEYS[1], ARGV[1])
else
  call('ZADD', KEYS[1], ARGV[3], ARGV[1])
end
return 1
