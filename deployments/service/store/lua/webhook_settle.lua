-- KEYS: webhooks, webhook, job, dead ; ARGV: id, token, outcome (delivered|retry|dead), delay_s, error,
--   dead letter (JSON), dead_max
-- only the holder of the attempt's claim records its outcome (after a lost lease another replica has it)
if redis.call('HGET', KEYS[2], 'claim') ~= ARGV[2] then return 0 end
if ARGV[3] == 'retry' then
  redis.call('ZADD', KEYS[1], server_now() + tonumber(ARGV[4]), ARGV[1])  -- due in delay_s, Redis time
  redis.call('HSET', KEYS[2], 'last_error', ARGV[5], 'claim', '')
  return 1
end
if ARGV[3] == 'dead' then
  redis.call('LPUSH', KEYS[4], ARGV[6])
  redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[7]) - 1)
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
if redis.call('EXISTS', KEYS[3]) == 1 then  -- never revive an expired job record
  redis.call('HSET', KEYS[3], 'webhook', ARGV[3] == 'dead' and 'failed' or 'delivered')
end
return 1
