-- KEYS: meta, versions; ARGV: version, now, channel, message prefix
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'current', ARGV[1], 'updated_at', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4] .. ARGV[1] .. '}')
return tonumber(ARGV[1])
