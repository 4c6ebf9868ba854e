-- KEYS: expiring ; ARGV: member, after_s
redis.call('ZADD', KEYS[1], server_now() + tonumber(ARGV[2]), ARGV[1])
return 1
