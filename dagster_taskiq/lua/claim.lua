-- claim: take the best waiting task across a consumer's queues and lease it to the consumer.
-- Best = lowest score (highest priority); on equal scores the earlier queue given wins, and
-- within a queue the member's sequence prefix keeps submission order.
--
-- KEYS[1]            leases  <prefix>:leases, sorted set of leased task ids by deadline (ms)
-- KEYS[2..n+1]       queues  the consumer's queue sorted sets, in its order of preference
-- KEYS[n+2..2n+1]    wakes   their wake lists, same order
-- KEYS[2n+2]         claim   <prefix>:claim:<claim id>, chosen by the consumer for this claim:
--                            records what it got, for a minute, so a retry after a lost reply
--                            gets the same task back (same delivery) instead of leaving it to
--                            expire, which cost a step one of its deliveries and dropped a run
-- ARGV[1]            holder  the consumer's name
-- ARGV[2]            prefix  the key prefix, for <prefix>:task:<id>
-- ARGV[3]            n       the number of queues
-- Task hashes are named by ids read inside the script (from a queue member or the claim key),
-- so they cannot be declared: they are built from ARGV[2], whose hash tag puts them in the
-- same Cluster slot as every declared key.
--
-- Returns {id, body, token, lease seconds, its queue's key, ms since it was submitted, how many
-- earlier deliveries were handed back (the last two for the worker's metrics)}, or nil when every queue is empty (the wake lists are then cleared, so the
-- consumer blocks on them until the next kick).

-- include: _now_ms.lua

local n = tonumber(ARGV[3])
local claim = KEYS[2 * n + 2]
local prior = redis.call('GET', claim)
if prior then
  local task = ARGV[2] .. ':task:' .. prior
  local f = redis.call('HMGET', task, 'holder', 'body', 'token', 'lease', 'zset', 'enqueued_ms',
                       'released')
  if f[1] == ARGV[1] then
    -- A write, so a WAIT after this retry confirms that the claim reached a replica.
    redis.call('EXPIRE', claim, 60)
    return {prior, f[2], tonumber(f[3]), f[4], f[5], now_ms - tonumber(f[6] or now_ms),
            tonumber(f[7] or 0)}
  end
end
while true do
  local best, best_member, best_score = nil, nil, nil
  for i = 2, n + 1 do
    local top = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
    if top[1] then
      local score = tonumber(top[2])
      if best_score == nil or score < best_score then
        best, best_member, best_score = i, top[1], score
      end
    end
  end
  if best == nil then
    for i = n + 2, 2 * n + 1 do redis.call('DEL', KEYS[i]) end
    return nil
  end
  redis.call('ZREM', KEYS[best], best_member)
  if redis.call('ZCARD', KEYS[best]) > 0 then redis.call('RPUSH', KEYS[best + n], '1') end
  local id = string.sub(best_member, 17)
  local task = ARGV[2] .. ':task:' .. id
  local body = redis.call('HGET', task, 'body')
  -- A member without a hash (dropped meanwhile) is skipped: try the next best.
  if body then
    local token = redis.call('HINCRBY', task, 'token', 1)
    redis.call('HSET', task, 'holder', ARGV[1])
    local f = redis.call('HMGET', task, 'lease', 'enqueued_ms', 'released')
    redis.call('ZADD', KEYS[1], now_ms + tonumber(f[1]) * 1000, id)
    redis.call('SET', claim, id, 'EX', 60)
    return {id, body, token, f[1], KEYS[best], now_ms - tonumber(f[2] or now_ms),
            tonumber(f[3] or 0)}
  end
end
