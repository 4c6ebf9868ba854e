-- KEYS: job, events ; ARGV: id, now, progress, maxlen, token
if not holds(KEYS[1], ARGV[5]) then return 0 end  -- never revive a finished record, nor write for a lost lease
redis.call('HSET', KEYS[1], 'progress', ARGV[3], 'updated_at', ARGV[2])
emit(KEYS[1], KEYS[2], ARGV[1], ARGV[4])
return 1
