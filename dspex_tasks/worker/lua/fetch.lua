-- The reliable fetch of dspex_tasks/worker/fetch.py: pop the first waiting message and record it as
-- unacknowledged in the same atomic step; an entry that is not a kombu message goes to the dead-letter list.
-- KEYS: the queue keys in fetch order, then unacked, unacked_index, the dead-letter list.
-- ARGV[1]: now (seconds, as kombu stamps unacked_index). Returns {key, item, tag}, tag "" when set aside.
local n = #KEYS - 3
local unacked, index, dead = KEYS[n + 1], KEYS[n + 2], KEYS[n + 3]
for i = 1, n do
  local item = redis.call('RPOP', KEYS[i])
  if item then
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
      return {KEYS[i], item, tag}
    end
    if m == nil then ok, m = pcall(cjson.decode, item) end
    local head = (ok and type(m) == 'table' and type(m.headers) == 'table') and m.headers or {}
    redis.call('LPUSH', dead, cjson.encode({
      task_id = type(head.id) == 'string' and head.id or nil,
      task = type(head.task) == 'string' and head.task or nil,
      reason = 'not a message: a queue entry that is not kombu JSON with a delivery_tag and delivery_info',
      queue = KEYS[i], size = #item, raw = string.gsub(string.sub(item, 1, 2048), '[^ -~]', '?'),
      at = tonumber(ARGV[1])}))
    redis.call('LTRIM', dead, 0, 9999)
    return {KEYS[i], '', ''}
  end
end
return false
