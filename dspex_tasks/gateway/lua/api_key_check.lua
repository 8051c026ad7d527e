-- KEYS: api key hash, bucket; ARGV: digest ('' = no auth), default rate/min, bucket id
-- -> {status (0 unknown key, 1 limited, 2 ok), retry_after_ms, key id, limit, remaining, record JSON ('' = no auth)}
local rate = tonumber(ARGV[2])
local id = ARGV[3]
local rec = ''
if ARGV[1] ~= '' then
  rec = redis.call('HGET', KEYS[1], ARGV[1])
  if not rec then return {0, 0, '', 0, 0, ''} end
  local ok, data = pcall(cjson.decode, rec)
  if ok and type(data) == 'table' then
    if type(data['rate_per_min']) == 'number' then rate = data['rate_per_min'] end
    if type(data['id']) == 'string' then id = data['id'] end
  end
end
if rate <= 0 then return {2, 0, id, 0, 0, rec} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local per_ms = rate / 60000
local b = redis.call('HMGET', KEYS[2], 'tokens', 'ts')
local tokens = tonumber(b[1]) or rate
local ts = tonumber(b[2]) or now
tokens = math.min(rate, tokens + math.max(0, now - ts) * per_ms)
local status = 2
local wait = 0
if tokens < 1 then
  status = 1
  wait = math.ceil((1 - tokens) / per_ms)
else
  tokens = tokens - 1
end
redis.call('HSET', KEYS[2], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[2], math.ceil(60000 + 1 / per_ms))
return {status, wait, id, rate, math.floor(tokens), rec}
