-- KEYS: expiring, then the records of the uploads among the entries ; ARGV: the entries ('area:key')
-- the entries' files are gone: forget the entries, and each upload's record with its file
for _, member in ipairs(ARGV) do redis.call('ZREM', KEYS[1], member) end
for i = 2, #KEYS do redis.call('DEL', KEYS[i]) end
return 1
