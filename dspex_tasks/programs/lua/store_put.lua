-- KEYS: meta, versions, session programs, sessions zset, token key ("" = none)
-- ARGV: record json, signature, now, program, session, channel, ttl_s (0 = none), message prefix
if KEYS[5] ~= '' then
  local done = redis.call('GET', KEYS[5])
  if done then return tonumber(done) end
end
local v = redis.call('HINCRBY', KEYS[1], 'latest', 1)
redis.call('HSET', KEYS[2], v, ARGV[1])
redis.call('HSET', KEYS[1], 'current', v, 'signature', ARGV[2], 'updated_at', ARGV[3])
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[5])
local ttl = tonumber(ARGV[7])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
end
if KEYS[5] ~= '' then redis.call('SET', KEYS[5], v, 'EX', 86400) end
redis.call('PUBLISH', ARGV[6], ARGV[8] .. v .. '}')
return v
