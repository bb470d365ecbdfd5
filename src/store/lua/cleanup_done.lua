-- cleanup_done (no gate). KEYS: s, keys, c. ARGV: _, file_id, ...
-- Removes the files' cleanup entries and frees the fileKeys they still reserve.
for i = 2, #ARGV do
  local fid = ARGV[i]
  local fk = call('HGET', KEYS[3], fid)
  if fk then
    call('HDEL', KEYS[3], fid)
    if fk ~= '' and call('HGET', KEYS[2], fk) == '~' .. fid then
      call('HDEL', KEYS[2], fk)
    end
  end
end
return 'ok'
