-- Functions every script of the store may call. scripts.py puts them after a prelude of the
-- schema's constants, in Lua: EVENT_FIELDS (the job fields copied into each event), NOTIFY (the
-- events channel) and JOB_KEY_PREFIX (a job record's name without its id).
-- append the record's public fields to its event stream and announce them; returns the entry id
local function emit(job_key, events_key, id, maxlen)
  local values = redis.call('HMGET', job_key, unpack(EVENT_FIELDS))
  local entry, message = {}, {id = id}
  for i, name in ipairs(EVENT_FIELDS) do
    if values[i] then
      entry[#entry + 1] = name
      entry[#entry + 1] = values[i]
      message[name] = values[i]
    end
  end
  local eid = redis.call('XADD', events_key, 'MAXLEN', '~', maxlen, '*', unpack(entry))
  message['event'] = eid
  redis.call('PUBLISH', NOTIFY, cjson.encode(message))
  return eid
end
-- the store's clock, in seconds: deadlines never depend on the clock of the host that asks
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
-- the job is running under the lease `token` (its attempt number): the fence of a worker's writes
local function holds(job_key, token)
  local v = redis.call('HMGET', job_key, 'state', 'attempts')
  return v[1] == 'running' and v[2] == token
end
-- a finished record and its events expire after `retention` s; its files are deleted then
local function retire(job_key, events_key, expiring_key, id, retention)
  redis.call('EXPIRE', job_key, retention)
  redis.call('EXPIRE', events_key, retention)
  redis.call('ZADD', expiring_key, server_now() + tonumber(retention), 'results:' .. id)
end
-- a job that asked for a webhook and has just ended: queue its delivery, due now (Redis time;
-- `created_at` is the writer's `now`, for display)
local function enqueue_webhook(job_key, hook_key, hooks_key, id, now)
  local url = redis.call('HGET', job_key, 'webhook_url')
  if not url or url == '' then return end
  local v = redis.call('HMGET', job_key, 'state', 'result', 'error', 'finished_at')
  redis.call('HSET', hook_key, 'id', id, 'url', url, 'state', v[1], 'result', v[2] or '',
             'error', v[3] or '', 'finished_at', v[4] or '', 'attempts', 0, 'created_at', now)
  redis.call('ZADD', hooks_key, server_now(), id)
  redis.call('HSET', job_key, 'webhook', 'pending')
end
