-- heartbeat: push the lease deadlines of a consumer's tasks forward, and report the tasks it
-- lost and those the orchestrator asked to cancel.
--
-- KEYS[1]       leases  <prefix>:leases
-- KEYS[1+j]     task    <prefix>:task:<id j>, for j = 1..m, the tasks the consumer holds
-- ARGV[1]       holder  the consumer's name
-- ARGV[2j]      id      task j's id (the member in KEYS[1])
-- ARGV[2j+1]    token   task j's delivery token, as the claim returned it
--
-- Returns {lost ids, cancelled ids}: lost = no longer ours (redelivered, handed back or
-- acknowledged), so not renewed; cancelled = renewed, and flagged by a revoke.

-- include: _now_ms.lua

local lost, cancelled = {}, {}
for j = 1, #KEYS - 1 do
  local task, id, token = KEYS[1 + j], ARGV[2 * j], ARGV[2 * j + 1]
  local f = redis.call('HMGET', task, 'holder', 'token', 'lease', 'cancel')
  if f[1] ~= ARGV[1] or f[2] ~= token then
    table.insert(lost, id)
  else
    redis.call('ZADD', KEYS[1], now_ms + tonumber(f[3]) * 1000, id)
    if f[4] then table.insert(cancelled, id) end
  end
end
return {lost, cancelled}
