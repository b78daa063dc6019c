-- requeue: running -> queued without counting a failure.
--
-- Used when the worker gives a task back: it is shutting down, the memory guard
-- preempted it, or its lease turned out to be lost. ARGV: task_id, token, reason,
-- counter (task field to increment: "preempts", "releases" ...), new_mem,
-- new_shape (both "" to keep the requirement; the memory guard raises it to what
-- the task was seen to use, so it is next placed where it fits).
--
-- Invariants: fenced by the lease token; the task keeps its score (its place in
-- line) and its retries; counters move running -> queued in the same step.
-- Returns: 1 requeued, 0 rejected as stale.
local tid, token, reason, counter, new_mem, new_shape =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local tk = task_key(tid)
local f = redis.call('HMGET', tk, 'state', 'token')
if f[1] ~= 'running' or f[2] ~= token then
  reject_stale(tid, token, 'requeue')
  return 0
end
if new_mem ~= '' then
  redis.call('HSET', tk, 'mem', new_mem, 'shape', new_shape)
end
if counter == '' then counter = nil end
requeue_running(tid, reason, counter)
event('requeue', tid, 'reason', reason)
wake()
return 1
