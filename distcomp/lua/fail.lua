-- fail: running -> queued (a retry is left) or running -> failed.
--
-- ARGV: task_id, token, reason, retryable (0|1), retry_delay_ms (base; doubles with
-- every failure, capped at an hour), then result field/value pairs.
--
-- Invariants: fenced by the lease token like complete. A retryable failure is
-- retried while fails <= retries; the worker it failed on is added to the task's
-- exclusion list so another live worker gets it first. A final failure enters the
-- failed index (for `retry`) and the counters move in the same step.
-- Returns: 2 requeued for retry, 1 recorded failed, 0 rejected as stale.
local tid, token, reason, retryable = ARGV[1], ARGV[2], ARGV[3], ARGV[4] == '1'
local base_delay = tonumber(ARGV[5]) or 0
local tk = task_key(tid)
local f = redis.call('HMGET', tk, 'state', 'token', 'job', 'worker', 'retries', 'shape',
  'score', 'excl')
if f[1] ~= 'running' or f[2] ~= token then
  reject_stale(tid, token, 'fail')
  return 0
end
local now = now_ms()
drop_lease(tid, f[4])
if #ARGV > 5 then redis.call('HSET', tk, unpack(ARGV, 6)) end
local fails = redis.call('HINCRBY', tk, 'fails', 1)
if retryable and fails <= tonumber(f[5] or '0') then
  local excl = f[8] or '|'
  if not string.find(excl, '|' .. f[4] .. '|', 1, true) then excl = excl .. f[4] .. '|' end
  redis.call('HSET', tk, 'state', 'queued', 'reason', reason, 'worker', '', 'excl', excl)
  move(f[3], 'running', 'queued')
  if base_delay > 0 then
    local delay = math.min(base_delay * 2 ^ (fails - 1), 3600000)
    redis.call('ZADD', P .. 'delayed', int(now + delay), tid)
    redis.call('HSET', tk, 'not_before', int(now + delay))
  else
    make_ready(tid, f[6], f[7])
  end
  event('retry', tid, 'worker', f[4], 'reason', reason)
  wake()
  return 2
end
finish_failed(tid, f[3], f[4], reason, now)
return 1
