-- KEYS: job, running, events, expiring, webhook, webhooks ; ARGV: id, now, new_state, field, value, retention, token, maxlen
if not holds(KEYS[1], ARGV[7]) then
  -- the same attempt writing again (a retried call whose reply was lost) is told it succeeded
  return redis.call('HGET', KEYS[1], 'recorded_by') == ARGV[7] and 1 or 0
end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'finished_at', ARGV[2], 'updated_at', ARGV[2], 'recorded_by', ARGV[7])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], ARGV[4], ARGV[5]) end
redis.call('ZREM', KEYS[2], ARGV[1])
emit(KEYS[1], KEYS[3], ARGV[1], ARGV[8])
retire(KEYS[1], KEYS[3], KEYS[4], ARGV[1], ARGV[6])
enqueue_webhook(KEYS[1], KEYS[5], KEYS[6], ARGV[1], ARGV[2])
return 1
