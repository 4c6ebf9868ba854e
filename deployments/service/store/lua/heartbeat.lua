-- KEYS: job, running ; ARGV: id, token, lease_s
if not holds(KEYS[1], ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[2], server_now() + tonumber(ARGV[3]), ARGV[1])
return 1
