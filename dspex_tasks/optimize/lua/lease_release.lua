-- Drop the run's lease only if this worker holds it (a lapsed lease may belong to another worker now).
-- KEYS[1]: the lease. ARGV[1]: the holder's token.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end
