-- Helper included by scripts (see broker.py's loader): defines
-- `push_revoked(reply_to, id, lost, reason, ttl)`, which tells a task's waiter that the task
-- will never produce a result.
--   reply_to  the waiter's reply list, read from the task's hash (a key under the same prefix,
--             so the same hash tag and slot); '' or missing: nobody waits, nothing is written
--   id        the task id
--   lost      true when its worker died or left, false when the orchestrator revoked it
--   reason    shown to the user
--   ttl       seconds the list lives on: its orchestrator deletes it when done, and a late
--             revoke or lost worker may re-create it after that, so it must expire
local function push_revoked(reply_to, id, lost, reason, ttl)
  if not reply_to or reply_to == '' then return end
  redis.call('RPUSH', reply_to,
             cjson.encode({task_id = id, revoked = true, lost = lost, reason = reason}))
  redis.call('EXPIRE', reply_to, ttl)
end
