-- The reliable fetch of dspex_tasks/worker/fetch.py: pop waiting messages and record each as unacknowledged
-- in the same atomic step; an entry that is not a kombu message goes to the dead-letter list.
-- KEYS: the queue keys in fetch order, then unacked, unacked_index, the dead-letter list.
-- ARGV[1]: now (seconds, as kombu stamps unacked_index); ARGV[2]: the most entries to take (default 1), from
-- the first non-empty queue on. Returns {key, item, tag, key, item, tag, ...}, tag "" for an entry set aside,
-- or false when every queue is empty.
local n = #KEYS - 3
local unacked, index, dead = KEYS[n + 1], KEYS[n + 2], KEYS[n + 3]
local limit = tonumber(ARGV[2]) or 1
local out = {}
local taken = 0
for i = 1, n do
  while taken < limit do
    local item = redis.call('RPOP', KEYS[i])
    if not item then break end
    taken = taken + 1
    -- kombu writes "properties" last: decode that tail, not a body of megabytes (an escaped key inside a
    -- string reads \"properties\" and cannot match); anything else is decoded whole.
    local props
    local at = string.find(item, '"properties": {', math.max(1, #item - 4096), true)
    if at and string.sub(item, -1) == '}' then
      local ok, p = pcall(cjson.decode, string.sub(item, at + 14, -2))
      if ok then props = p end
    end
    local ok, m = true, nil
    if type(props) ~= 'table' then
      ok, m = pcall(cjson.decode, item)
      if ok and type(m) == 'table' then props = m.properties end
    end
    local tag, ex, rk
    if type(props) == 'table' then
      tag = props.delivery_tag
      local info = props.delivery_info
      if type(info) == 'table' then ex = info.exchange; rk = info.routing_key end
    end
    if type(tag) == 'string' and tag ~= '' and type(ex) == 'string' and type(rk) == 'string' then
      redis.call('ZADD', index, ARGV[1], tag)
      redis.call('HSET', unacked, tag, '[' .. item .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
      out[#out + 1] = KEYS[i]; out[#out + 1] = item; out[#out + 1] = tag
    else
      if m == nil then ok, m = pcall(cjson.decode, item) end
      local head = (ok and type(m) == 'table' and type(m.headers) == 'table') and m.headers or {}
      redis.call('LPUSH', dead, cjson.encode({
        task_id = type(head.id) == 'string' and head.id or nil,
        task = type(head.task) == 'string' and head.task or nil,
        reason = 'not a message: a queue entry that is not kombu JSON with a delivery_tag and delivery_info',
        queue = KEYS[i], size = #item, raw = string.gsub(string.sub(item, 1, 2048), '[^ -~]', '?'),
        at = tonumber(ARGV[1])}))
      redis.call('LTRIM', dead, 0, 9999)
      out[#out + 1] = KEYS[i]; out[#out + 1] = ''; out[#out + 1] = ''
    end
  end
  if taken >= limit then break end
end
if #out == 0 then return false end
return out
