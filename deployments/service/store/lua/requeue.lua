-- KEYS: job, queue, running, events, expiring, webhook, webhooks ; ARGV: id, now, max_attempts, error, retention, maxlen, token
-- Back to the queue (keeping its place), or failed once its attempts are used up. Without a token: the
-- reconciler, for a running job whose lease deadline passed; with one: the worker giving its job back.
local state = redis.call('HGET', KEYS[1], 'state')
if ARGV[7] == '' then
  if state ~= 'running' then
    redis.call('ZREM', KEYS[3], ARGV[1])
    return 0
  end
  local deadline = redis.call('ZSCORE', KEYS[3], ARGV[1])
  if deadline and tonumber(deadline) > server_now() then return 0 end
elseif not holds(KEYS[1], ARGV[7]) then
  return 0
end
redis.call('ZREM', KEYS[3], ARGV[1])
if tonumber(redis.call('HGET', KEYS[1], 'attempts')) >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'state', 'failed', 'error', ARGV[4], 'finished_at', ARGV[2], 'updated_at', ARGV[2])
  emit(KEYS[1], KEYS[4], ARGV[1], ARGV[6])
  retire(KEYS[1], KEYS[4], KEYS[5], ARGV[1], ARGV[5])
  enqueue_webhook(KEYS[1], KEYS[6], KEYS[7], ARGV[1], ARGV[2])
  return 2
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'worker', '', 'cancel_requested', '', 'updated_at', ARGV[2])
redis.call('ZADD', KEYS[2], redis.call('HGET', KEYS[1], 'created_at'), ARGV[1])
emit(KEYS[1], KEYS[4], ARGV[1], ARGV[6])
return 1
