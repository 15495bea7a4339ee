-- revoke: drop queued tasks (their waiters get a 'revoked' reply) and flag running ones for
-- cancellation (their worker's heartbeat learns it and stops them).
--
-- KEYS[j]     task       <prefix>:task:<id j>, for j = 1..m
-- ARGV[1]     reply_ttl  seconds a reply list written here lives on
-- ARGV[1+j]   id         task j's id
-- Undeclared keys: each task's queue and reply_to keys, read from its hash (stored there by
-- kick, all under the prefix: same hash tag, same Cluster slot).
--
-- Returns one state per task, in order: 'dropped' (was queued), 'running:<holder>' (flagged)
-- or 'gone' (no such task: finished or dropped before).

-- include: _revoked_reply.lua

local states = {}
for j = 1, #KEYS do
  local task, id = KEYS[j], ARGV[1 + j]
  local f = redis.call('HMGET', task, 'zset', 'member', 'holder', 'reply_to')
  if not f[1] then
    table.insert(states, 'gone')
  elseif not f[3] then
    redis.call('ZREM', f[1], f[2])
    redis.call('DEL', task)
    push_revoked(f[4], id, false, 'revoked while queued', ARGV[1])
    table.insert(states, 'dropped')
  else
    redis.call('HSET', task, 'cancel', '1')
    table.insert(states, 'running:' .. f[3])
  end
end
return states
