-- requeue: running -> queued without counting a failure (or -> failed, see below).
--
-- Used when the worker gives a task back: it is shutting down, the memory guard
-- preempted it, or its lease turned out to be lost. ARGV: task_id, token, reason,
-- counter (task field to increment: "preempts", "releases" ...), new_mem,
-- new_shape (both "" to keep the requirement; the memory guard raises it to what
-- the task was seen to use, so it is next placed where it fits), max_count
-- ("" = no cap on the counter), no_fit_reason ("" = no check).
--
-- Invariants: fenced by the lease token; the task keeps its score (its place in
-- line) and its retries; counters move in the same step. It fails instead of
-- going back to the queue when the counter passes max_count (no endless
-- preemption loop), or when no_fit_reason is given and no live worker has the
-- memory the task now needs (it would wait forever).
-- Returns: 1 requeued, 2 failed, 0 rejected as stale.
local tid, token, reason, counter, new_mem, new_shape, max_count, no_fit_reason =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7] or ''), ARGV[8] or ''
local tk = task_key(tid)
local f = redis.call('HMGET', tk, 'state', 'token', 'job', 'worker', 'mem')
if f[1] ~= 'running' or f[2] ~= token then
  reject_stale(tid, token, 'requeue')
  return 0
end
local now = now_ms()
local mem = tonumber(f[5] or '0')
if new_mem ~= '' then
  mem = tonumber(new_mem)
  redis.call('HSET', tk, 'mem', new_mem, 'shape', new_shape)
end
local count = 0
if counter ~= '' then count = tonumber(redis.call('HGET', tk, counter) or '0') + 1 end
if max_count and count > max_count then
  redis.call('HSET', tk, counter, count)
  finish_failed(tid, f[3], f[4], reason .. '; gave up after ' .. max_count .. ' times', now)
  return 2
end
if no_fit_reason ~= '' and not any_worker_fits(mem, now) then
  if counter ~= '' then redis.call('HSET', tk, counter, count) end
  finish_failed(tid, f[3], f[4], no_fit_reason, now)
  return 2
end
if counter == '' then counter = nil end
requeue_running(tid, reason, counter)
event('requeue', tid, 'reason', reason)
wake()
return 1
