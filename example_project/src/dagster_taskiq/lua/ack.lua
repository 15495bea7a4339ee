-- ack: delete a finished task, if the caller still holds this delivery of it.
--
-- KEYS[1]  leases  <prefix>:leases
-- KEYS[2]  task    <prefix>:task:<id>
-- ARGV[1]  id      the task id (its member in KEYS[1])
-- ARGV[2]  holder  the consumer's name
-- ARGV[3]  token   the delivery token its claim returned
--
-- Returns 1 when deleted, 0 when the task is not ours any more (lost to another worker,
-- handed back): then it is left alone.

local f = redis.call('HMGET', KEYS[2], 'holder', 'token')
if f[1] == ARGV[2] and f[2] == ARGV[3] then
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
