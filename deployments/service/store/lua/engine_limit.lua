-- KEYS: engine_limits ; ARGV: model, limit (JSON with budget_bytes, stamped `at` by the caller in
-- Redis time), keep_s
-- Keeps the largest budget reported of the model within keep_s: a report replaces the stored one
-- when its budget is at least as large (renewing it), or when the stored one is older than keep_s
-- (the generators that reported it are long gone: trust the newer hardware). Returns 1 if written.
local stored = redis.call('HGET', KEYS[1], ARGV[1])
local new = cjson.decode(ARGV[2])
if stored then
  local ok, old = pcall(cjson.decode, stored)
  if ok and type(old) == 'table' and tonumber(old['budget_bytes'])
      and tonumber(old['budget_bytes']) > tonumber(new['budget_bytes'])
      and tonumber(new['at']) - (tonumber(old['at']) or 0) <= tonumber(ARGV[3]) then
    return 0
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
