-- cleanup_done (no gate). KEYS: s, c. ARGV: _, file_id, ...
-- Removes the files' cleanup entries (storage confirmed them). One HDEL per id: Lua's
-- unpack has a limit (~8,000 values) a large session's cleanup would pass.
for i = 2, #ARGV do call('HDEL', KEYS[2], ARGV[i]) end
return 'ok'
