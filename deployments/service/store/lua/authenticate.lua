-- KEYS: record ; ARGV: now, requests_per_minute, burst (the service's; the key's own quotas override them)
-- Returns {'unknown'}, {'revoked'}, {'limited', seconds until a token, rate, burst} or {'ok', the record}.
local f = redis.call('HMGET', KEYS[1], 'id', 'revoked_at', 'quotas', 'tokens', 'tokens_at')
if not f[1] then return {'unknown'} end
if f[2] and f[2] ~= '' then return {'revoked'} end
local own = (f[3] and f[3] ~= '') and cjson.decode(f[3]) or {}
local per_minute = tonumber(own['requests_per_minute'] or ARGV[2])
local burst = tonumber(own['burst'] or ARGV[3])
local now = tonumber(ARGV[1])
local tokens = tonumber(f[4]) or burst
local since = math.max(0, now - (tonumber(f[5]) or now))  -- another replica's clock may be behind
tokens = math.min(burst, tokens + since * per_minute / 60)
if tokens < 1 then
  return {'limited', tostring((1 - tokens) * 60 / per_minute), tostring(per_minute), tostring(burst)}
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'tokens_at', ARGV[1])
local out = redis.call('HGETALL', KEYS[1])
table.insert(out, 1, 'ok')
return out
