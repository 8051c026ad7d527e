-- KEYS: meta, versions; ARGV: version (0 = current) -> record json or false, version
local v = ARGV[1]
if v == '0' then
  v = redis.call('HGET', KEYS[1], 'current')
  if not v then return {false, 0} end
end
return {redis.call('HGET', KEYS[2], v), tonumber(v)}
