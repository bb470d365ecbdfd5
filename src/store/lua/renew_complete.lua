-- renew_complete (no gate). KEYS: s, f. ARGV: _, token, lease_until (ms, precomputed).
-- Reply: 1 when the lease was extended, 0 when `token` no longer holds it.
local st = call('HMGET', KEYS[2], 'status', 'lease_token')
if st[1] == 'completing' and st[2] == ARGV[2] then
  call('HSET', KEYS[2], 'lease_until', ARGV[3])
  return 1
end
return 0
