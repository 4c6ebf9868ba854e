-- KEYS: job, queue, running, events, expiring, webhook, webhooks ; ARGV: id, now, error, retention, maxlen
-- queued: canceled at once; running: flagged, the worker stops before its next step. Returns the state.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return '' end
if state == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'canceled', 'error', ARGV[3], 'finished_at', ARGV[2], 'updated_at', ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[1])
  emit(KEYS[1], KEYS[4], ARGV[1], ARGV[5])
  retire(KEYS[1], KEYS[4], KEYS[5], ARGV[1], ARGV[4])
  enqueue_webhook(KEYS[1], KEYS[6], KEYS[7], ARGV[1], ARGV[2])
  return 'canceled'
end
if state == 'running' and redis.call('HGET', KEYS[1], 'cancel_requested') ~= '1' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'updated_at', ARGV[2])
  emit(KEYS[1], KEYS[4], ARGV[1], ARGV[5])
end
return state
