-- tus_release (no gate). KEYS: s, f. ARGV: _, token.
-- The PATCH lock is dropped if `token` holds it.
if call('HGET', KEYS[2], 'tus_lock') == ARGV[2] then
  call('HDEL', KEYS[2], 'tus_lock', 'tus_lock_until')
end
return 1
