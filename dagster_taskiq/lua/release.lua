-- release: a worker shutting down hands its tasks back. A step goes back to the front of its
-- queue (its place by priority and sequence; this delivery does not count), a run is dropped
-- and its waiter told (a run that started cannot simply start again elsewhere), unless
-- keep_runs: a claim handed back before it started (no replica confirmed it) requeues runs too.
--
-- KEYS[1]     leases     <prefix>:leases
-- KEYS[1+j]   task       <prefix>:task:<id j>, for j = 1..m, the tasks handed back
-- ARGV[1]     holder     the worker's consumer name
-- ARGV[2]     reply_ttl  seconds a reply list written here lives on
-- ARGV[3]     keep_runs  1: requeue runs as steps are; 0: drop them
-- ARGV[2+2j]  id         task j's id
-- ARGV[3+2j]  token      task j's delivery token
-- Undeclared keys: each task's queue, wake and reply_to keys, read from its hash (stored there
-- by kick, all under the prefix: same hash tag, same Cluster slot).
--
-- Returns the ids handed back (those still held by this holder and delivery).

-- include: _revoked_reply.lua

local released = {}
for j = 1, #KEYS - 1 do
  local task, id, token = KEYS[1 + j], ARGV[2 + 2 * j], ARGV[3 + 2 * j]
  local f = redis.call('HMGET', task, 'holder', 'token', 'zset', 'member', 'score', 'redeliver',
                       'wake', 'reply_to')
  if f[1] == ARGV[1] and f[2] == token then
    redis.call('ZREM', KEYS[1], id)
    if tonumber(f[6]) > 1 or ARGV[3] == '1' then
      redis.call('HDEL', task, 'holder')
      redis.call('HINCRBY', task, 'released', 1)
      redis.call('ZADD', f[3], f[5], f[4])
      redis.call('RPUSH', f[7], '1')
    else
      redis.call('DEL', task)
      push_revoked(f[8], id, true, 'its worker ' .. ARGV[1] .. ' shut down while running it',
                   ARGV[2])
    end
    table.insert(released, id)
  end
end
return released
