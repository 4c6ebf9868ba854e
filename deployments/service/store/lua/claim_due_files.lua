-- KEYS: expiring ; ARGV: limit, claim_s
-- the entries whose time is up, pushed claim_s into the future: no other sweeper takes them meanwhile
local now = server_now()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), member) end
return due
