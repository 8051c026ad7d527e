-- Extend the run's lease only if this worker still holds it.
-- KEYS[1]: the lease. ARGV: the holder's token, the new time to live (ms).
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end
