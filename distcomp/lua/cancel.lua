-- cancel: queued -> cancelled, running -> cancelled, for tasks or whole jobs.
--
-- ARGV: reason, then task ids. (The client expands a job into its ids, which are
-- known without a scan: job J holds J.1 .. J.n_tasks.)
--
-- Invariants: a finished task is left as it is; a running task loses its lease
-- at once, so its worker's renew reports it lost (and a control message asks the
-- worker to kill it now), and the worker's later completion is rejected as stale.
-- A cancelled task enters the `cancelled` index by finish time (for retry and
-- history trimming).
-- The event says what the task was (`was`: queued or running): a future treats
-- a call cancelled while it ran as failed with CancelledError, not as cancelled.
-- Returns: number of tasks cancelled.
local reason = ARGV[1]
local now = now_ms()
local n = 0
for i = 2, #ARGV do
  local tid = ARGV[i]
  local tk = task_key(tid)
  local f = redis.call('HMGET', tk, 'state', 'job', 'shape', 'worker')
  if f[1] == 'queued' then
    unqueue(tid, f[3])
  elseif f[1] == 'running' then
    drop_lease(tid, f[4])
    redis.call('PUBLISH', P .. 'control', 'cancel ' .. f[4] .. ' ' .. tid)
  end
  if f[1] == 'queued' or f[1] == 'running' then
    redis.call('HSET', tk, 'state', 'cancelled', 'reason', reason, 'finished_at', int(now))
    redis.call('ZADD', P .. 'cancelled', int(now), tid)
    move(f[2], f[1], 'cancelled')
    event('cancelled', tid, 'reason', reason, 'was', f[1])
    n = n + 1
  end
end
return n
