-- KEYS: webhooks, webhook ; ARGV: id, now, lease_deadline, token
-- the delivery if it is due (a claim by another replica moved its score past now), with its lease taken
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not due or tonumber(due) > tonumber(ARGV[2]) then return false end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return false
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('HINCRBY', KEYS[2], 'attempts', 1)
redis.call('HSET', KEYS[2], 'claim', ARGV[4])
return redis.call('HGETALL', KEYS[2])
