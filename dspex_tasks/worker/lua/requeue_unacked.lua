-- Move an unacknowledged message back to its queue(s), even when Redis is full (dspex_tasks.worker.storefull).
-- KEYS[1] unacked hash, KEYS[2] unacked index, KEYS[3..] the queue lists; ARGV: tag, message, "left"|"right".
-- The first write is HDEL, which frees memory: Redis refuses a script's first write when used memory is above
-- maxmemory only if that write may grow memory, and lets a script that already wrote go on, so the push runs.
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0  -- already acknowledged or restored: never doubled
end
redis.call('ZREM', KEYS[2], ARGV[1])
local push = ARGV[3] == 'left' and 'LPUSH' or 'RPUSH'
for i = 3, #KEYS do
  redis.call(push, KEYS[i], ARGV[2])
end
return 1
