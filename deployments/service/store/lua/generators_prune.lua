-- KEYS: generators ; ARGV: default ttl_s
-- The live reports (JSON, as written); deletes those older than their own ttl_s (default ARGV[1]) in
-- Redis time. One step: a report renewed since it went stale is read renewed, and kept.
local now, live, stale = server_now(), {}, {}
local reports = redis.call('HGETALL', KEYS[1])
for i = 1, #reports, 2 do
  local ok, report = pcall(cjson.decode, reports[i + 1])
  local at = ok and type(report) == 'table' and tonumber(report['at']) or 0
  local ttl = ok and type(report) == 'table' and tonumber(report['ttl_s']) or tonumber(ARGV[1])
  if now - at > ttl then stale[#stale + 1] = reports[i] else live[#live + 1] = reports[i + 1] end
end
if #stale > 0 then redis.call('HDEL', KEYS[1], unpack(stale)) end
return live
