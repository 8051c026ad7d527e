-- KEYS: buckets. ARGV[1]: reserve within (ms); ARGV[2]: the Redis time a slot to redeem is for (ms, or
-- 0); then per bucket: emission interval (ms/unit), tolerance (ms), cost.
-- Returns {reserved 1|0, wait_ms, now_ms}; a slot being redeemed answers {2, its wait, now} instead.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local max_wait = tonumber(ARGV[1])
local slot = tonumber(ARGV[2])
if slot > 0 then return {2, tostring(slot - now), tostring(now)} end
local send = now
local tats = {}
for i = 1, #KEYS do
  local b = 2 + (i - 1) * 3
  local interval, tol, cost = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  tats[i] = tat
  local allowed = tat + cost * interval - tol
  if allowed > send then send = allowed end
end
local wait = send - now
if wait > max_wait then return {0, tostring(wait), tostring(now)} end
for i = 1, #KEYS do
  local b = 2 + (i - 1) * 3
  local interval, tol, cost = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local tat = tats[i]
  if send > tat then tat = send end
  local new = tat + cost * interval
  redis.call('SET', KEYS[i], string.format('%.3f', new), 'PX', math.ceil(new - now + tol) + 1000)
end
return {1, tostring(wait), tostring(now)}
