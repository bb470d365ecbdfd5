-- release_complete (no gate). KEYS: s, f. ARGV: _, token. Reply: 'ok'.
if call('EXISTS', SKEY) == 1 then
  local st = call('HMGET', KEYS[2], 'status', 'lease_token')
  if st[1] == 'completing' and st[2] == ARGV[2] then
    call('HSET', KEYS[2], 'status', 'registered')
    call('HDEL', KEYS[2], 'lease_token', 'lease_until')
  end
end
return 'ok'
