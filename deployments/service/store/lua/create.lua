-- KEYS: job, queue, recent, idem, events, owner's recent, owner's active, owner's usage today
-- ARGV: id, now, params, idem_key, idem_ttl, maxlen, max_queue, owner, audio_s, usage_ttl,
--       then the owner's quotas: active_jobs, queued_jobs, songs_per_day, audio_s_per_day ('' = none),
--       webhook_url ('' = none)
if KEYS[4] ~= '' then
  local existing = redis.call('GET', KEYS[4])
  if existing then return {'existing', existing} end
end
local depth = redis.call('ZCARD', KEYS[2])
if depth >= tonumber(ARGV[7]) then return {'full', tostring(depth)} end
if ARGV[8] ~= '' then
  -- the owner's jobs that wait or run (finished and expired ones leave the set here); the earliest
  -- start and best queue rank tell when one may end. Their records are read by name: the store is
  -- one Redis, not a cluster.
  local queued, running, first_start, first_rank = 0, 0, '', ''
  for _, other in ipairs(redis.call('SMEMBERS', KEYS[7])) do
    local state, started = unpack(redis.call('HMGET', JOB_KEY_PREFIX .. other, 'state', 'started_at'))
    if state == 'queued' then
      queued = queued + 1
      local rank = redis.call('ZRANK', KEYS[2], other)
      if rank and (first_rank == '' or rank < first_rank) then first_rank = rank end
    elseif state == 'running' then
      running = running + 1
      local t = tonumber(started)
      if t and (first_start == '' or t < first_start) then first_start = t end
    else
      redis.call('SREM', KEYS[7], other)
    end
  end
  if ARGV[11] ~= '' then
    local when = {tostring(first_start), tostring(first_rank)}
    local songs, audio = unpack(redis.call('HMGET', KEYS[8], 'songs', 'audio_s'))
    songs, audio = tonumber(songs) or 0, tonumber(audio) or 0
    if queued + running >= tonumber(ARGV[11]) then
      return {'quota', 'active_jobs', ARGV[11], tostring(queued + running), unpack(when)}
    end
    if queued >= tonumber(ARGV[12]) then
      return {'quota', 'queued_jobs', ARGV[12], tostring(queued), unpack(when)}
    end
    if songs + 1 > tonumber(ARGV[13]) then return {'quota', 'songs_per_day', ARGV[13], tostring(songs)} end
    if audio + tonumber(ARGV[9]) > tonumber(ARGV[14]) then
      return {'quota', 'audio_s_per_day', ARGV[14], tostring(audio)}
    end
  end
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'state', 'queued', 'params', ARGV[3], 'created_at', ARGV[2],
           'updated_at', ARGV[2], 'attempts', 0, 'idempotency_key', ARGV[4], 'owner', ARGV[8])
if ARGV[15] ~= '' then redis.call('HSET', KEYS[1], 'webhook_url', ARGV[15]) end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
if KEYS[4] ~= '' then redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[5]) end
if ARGV[8] ~= '' then
  redis.call('ZADD', KEYS[6], ARGV[2], ARGV[1])
  redis.call('SADD', KEYS[7], ARGV[1])
  redis.call('HINCRBY', KEYS[8], 'songs', 1)
  redis.call('HINCRBYFLOAT', KEYS[8], 'audio_s', ARGV[9])
  redis.call('EXPIRE', KEYS[8], ARGV[10])
end
emit(KEYS[1], KEYS[5], ARGV[1], ARGV[6])
return {'created', ARGV[1]}
