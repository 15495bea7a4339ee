-- kick: queue a task (a step or a run) in its queue.
--
-- KEYS[1]  task        <prefix>:task:<id>, the task's hash, created here
-- KEYS[2]  queue       <prefix>:queue:<q> (steps) or <prefix>:runs:<q> (runs), a sorted set
-- KEYS[3]  wake        <prefix>:wake:<q> or <prefix>:wakeruns:<q>, wakes a blocked consumer
-- KEYS[4]  seq         <prefix>:seq, the submission counter that keeps equal priorities FIFO
-- ARGV[1]  id          the task id
-- ARGV[2]  body        taskiq's message (JSON)
-- ARGV[3]  score       -priority (the lowest score pops first)
-- ARGV[4]  lease       seconds each delivery's lease lasts without a heartbeat
-- ARGV[5]  reply_to    the waiter's reply list (a key under the same prefix) or ''
-- ARGV[6]  deliveries  how many deliveries the task may get
-- The names of KEYS[2], KEYS[3] and ARGV[5] are stored in the hash, so the scripts that move
-- or drop the task later find them there.
--
-- Returns the task's sequence number, or 0 when the task exists already: a submit retried
-- after its reply was lost is left as it is (idempotent).

-- include: _now_ms.lua

if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local seq = redis.call('INCR', KEYS[4])
local member = string.format('%015d|', seq) .. ARGV[1]
redis.call('HSET', KEYS[1], 'body', ARGV[2], 'zset', KEYS[2], 'wake', KEYS[3], 'member', member,
           'score', ARGV[3], 'lease', ARGV[4], 'reply_to', ARGV[5], 'enqueued_ms', now_ms,
           'redeliver', ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[3], member)
redis.call('RPUSH', KEYS[3], '1')
redis.call('LTRIM', KEYS[3], -100, -1)
return seq
