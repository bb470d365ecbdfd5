-- cleanup_done (no gate). KEYS: s, c. ARGV: _, file_id, ...
-- Removes the files' cleanup entries (storage confirmed them).
call('HDEL', KEYS[2], unpack(ARGV, 2))
return 'ok'
