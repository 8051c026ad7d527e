-- KEYS[1]: a bucket. ARGV: delta (ms, may be negative: a refund), tolerance (ms).
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local new = tat + tonumber(ARGV[1])
if new < now then new = now end
redis.call('SET', KEYS[1], string.format('%.3f', new), 'PX', math.ceil(new - now + tonumber(ARGV[2])) + 1000)
return 1
