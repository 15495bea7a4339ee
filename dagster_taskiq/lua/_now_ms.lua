-- Helper included by scripts (see broker.py's loader): defines `now_ms`, the Redis server's
-- clock in milliseconds. Lease deadlines and enqueue times come from the server, never from a
-- client: a host whose clock runs ahead cannot expire every lease in the cluster.
-- Touches no key.
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
