-- reap: handle leases that ran out (their worker stopped heartbeating). A step with deliveries
-- left goes back to its queue, in the place it had; a run, a cancelled task or a step out of
-- deliveries is dropped and its waiter told why.
--
-- KEYS[1]  leases     <prefix>:leases
-- ARGV[1]  prefix     the key prefix, for <prefix>:task:<id>
-- ARGV[2]  limit      at most this many expired leases per call
-- ARGV[3]  reply_ttl  seconds a reply list written here lives on
-- Undeclared keys, all named by data read inside the script and all under the prefix (same
-- hash tag, same Cluster slot as KEYS[1]): task hashes (ids from KEYS[1], names built from
-- ARGV[1]), and the queue, wake and reply_to keys stored in each task's hash by kick.
--
-- Returns {requeued ids, dropped ids}.

-- include: _now_ms.lua
-- include: _revoked_reply.lua

local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[2]))
local requeued, dropped = {}, {}
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local task = ARGV[1] .. ':task:' .. id
  local f = redis.call('HMGET', task, 'zset', 'member', 'score', 'cancel', 'holder', 'reply_to',
                       'token', 'redeliver', 'wake', 'released')
  if f[1] then
    -- Deliveries handed back by a draining worker (release) do not count.
    local used = tonumber(f[7] or '0') - tonumber(f[10] or '0')
    if f[4] or used >= tonumber(f[8] or '0') then
      redis.call('DEL', task)
      local reason = 'its worker ' .. (f[5] or '?') .. ' stopped heartbeating'
      if f[4] then reason = 'it was cancelled and ' .. reason end
      push_revoked(f[6], id, not f[4], reason, ARGV[3])
      table.insert(dropped, id)
    else
      redis.call('HDEL', task, 'holder')
      redis.call('HSET', task, 'lost_holder', f[5] or '')
      redis.call('ZADD', f[1], f[3], f[2])
      redis.call('RPUSH', f[9], '1')
      table.insert(requeued, id)
    end
  end
end
return {requeued, dropped}
