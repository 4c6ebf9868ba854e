-- KEYS: record, index ; ARGV: id, name, role, created_at, quotas, digest
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'name', ARGV[2], 'role', ARGV[3], 'created_at', ARGV[4],
           'quotas', ARGV[5])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[6])
return 1
