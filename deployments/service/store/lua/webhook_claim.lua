-- KEYS: webhooks, webhook ; ARGV: id, lease_s, token
-- the delivery if it is due in Redis time (a claim by another replica moved its score past now),
-- with its lease taken until Redis time + lease_s
local now = server_now()
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not due or tonumber(due) > now then return false end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return false
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HINCRBY', KEYS[2], 'attempts', 1)
redis.call('HSET', KEYS[2], 'claim', ARGV[3])
return redis.call('HGETALL', KEYS[2])
