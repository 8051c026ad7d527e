-- Reserve one call's units in every bucket it needs (GCRA), atomically and on Redis's clock.
-- KEYS: the buckets, then, when ARGV[3] > 0, the call's reservation: a hash {at, sent, buckets} per task and
-- call, so that asking again (a redelivered or re-queued task) gets the same slot, and a slot is sent once.
-- ARGV[1]: reserve only a slot within this (ms); ARGV[2]: a claimed slot to redeem (Redis ms, or 0);
-- ARGV[3]: how long a reservation outlives its slot (ms; 0: no reservation key); ARGV[4], ARGV[5]: a slot
-- is sent from this long before it to this long after it (ms); ARGV[6]: the buckets' names, joined;
-- then per bucket: emission interval (ms/unit), tolerance (ms), cost.
-- Returns {status, wait_ms, now_ms}. 1: reserved now; 0: nothing within ARGV[1] (wait: until a slot);
-- 2: the claimed slot's wait (nothing changed); 3: the call's reserved slot is due, now marked sent;
-- 4: the call's reserved slot is not due yet (nothing changed).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local claimed = tonumber(ARGV[2])
if claimed > 0 then return {2, string.format('%.3f', claimed - now), string.format('%.3f', now)} end
local life, early, late = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local n = #KEYS
local held = nil
if life > 0 then
  held = KEYS[n]
  n = n - 1
  local res = redis.call('HMGET', held, 'at', 'sent', 'buckets')
  local at = tonumber(res[1])
  -- a slot already sent, gone by, or for other buckets (a fallback model) is no use: reserve a new one
  if at and res[2] == '0' and res[3] == ARGV[6] then
    local wait = at - now
    if wait > early then return {4, string.format('%.3f', wait), string.format('%.3f', now)} end
    if wait >= -late then
      redis.call('HSET', held, 'sent', '1')
      return {3, string.format('%.3f', wait), string.format('%.3f', now)}
    end
  end
end
local send = now
local tats = {}
for i = 1, n do
  local b = 6 + (i - 1) * 3
  local interval, tol, cost = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  tats[i] = tat
  local allowed = tat + cost * interval - tol
  if allowed > send then send = allowed end
end
local wait = send - now
if wait > tonumber(ARGV[1]) then return {0, string.format('%.3f', wait), string.format('%.3f', now)} end
for i = 1, n do
  local b = 6 + (i - 1) * 3
  local interval, tol, cost = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local tat = tats[i]
  if send > tat then tat = send end
  local new = tat + cost * interval
  redis.call('SET', KEYS[i], string.format('%.3f', new), 'PX', math.ceil(new - now + tol) + 1000)
end
if held then
  local sent = '0'
  if wait <= early then sent = '1' end
  redis.call('HSET', held, 'at', string.format('%.3f', send), 'sent', sent, 'buckets', ARGV[6])
  redis.call('PEXPIRE', held, math.ceil(wait + life))
end
return {1, string.format('%.3f', wait), string.format('%.3f', now)}
