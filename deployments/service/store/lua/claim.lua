-- KEYS: job, queue, running, events ; ARGV: id, now, worker, lease_s, maxlen
-- returns the lease token (the new attempt number), or 0 when the job is not queued
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[3], 'started_at', ARGV[2], 'updated_at', ARGV[2])
local token = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], server_now() + tonumber(ARGV[4]), ARGV[1])
emit(KEYS[1], KEYS[4], ARGV[1], ARGV[5])
return token
