-- finish_complete (no expiry gate). KEYS: s, f, ev, evq. ARGV: now, token, file_url, etag.
-- Reply: {'ok','done', file} | {'ok','lost'} | {'snf'} | {'fnf'}.
if call('EXISTS', SKEY) == 0 then return {'snf'} end
local st = call('HMGET', KEYS[2], 'status', 'lease_token')
if not st[1] then return {'fnf'} end
if st[1] == 'completed' then return {'ok', 'done', call('HGETALL', KEYS[2])} end
if st[1] ~= 'completing' or st[2] ~= ARGV[2] then return {'ok', 'lost'} end
call('HSET', KEYS[2], 'status', 'completed', 'file_url', ARGV[3], 'etag', ARGV[4])
call('HDEL', KEYS[2], 'lease_token', 'lease_until')
record_event('file.completed', KEYS[2])
return {'ok', 'done', call('HGETALL', KEYS[2])}
