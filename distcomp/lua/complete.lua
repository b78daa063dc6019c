-- complete: running -> succeeded.
--
-- ARGV: task_id, token, then field/value pairs of the result (exit_code, wall,
-- peak_rss, host, out_tail, err_tail, out_path, err_path, started_at ...).
--
-- Invariants (fencing): applied only if the task is running under exactly this
-- lease token. A report from an older attempt, a cancelled task, or a task a
-- reaper already requeued is rejected and recorded as stale, never applied,
-- so no task is ever recorded finished twice. The task enters the `succeeded`
-- index (by finish time), which history trimming walks from its oldest end.
-- A small python result (at most 512 bytes of base64) rides along in the
-- `succeeded` event, so a waiting future needs no read of its own.
-- Returns: 1 applied, 0 rejected as stale.
local tid, token = ARGV[1], ARGV[2]
local tk = task_key(tid)
local f = redis.call('HMGET', tk, 'state', 'token', 'job', 'worker')
if f[1] ~= 'running' or f[2] ~= token then
  reject_stale(tid, token, 'complete')
  return 0
end
local now = now_ms()
drop_lease(tid, f[4])
if #ARGV > 2 then redis.call('HSET', tk, unpack(ARGV, 3)) end
redis.call('HSET', tk, 'state', 'succeeded', 'finished_at', int(now), 'reason', '')
redis.call('ZADD', P .. 'succeeded', int(now), tid)
move(f[3], 'running', 'succeeded')
local result = redis.call('HGET', tk, 'result')
if result and #result > 0 and #result <= 512 then
  event('succeeded', tid, 'worker', f[4], 'result', result)
else
  event('succeeded', tid, 'worker', f[4])
end
return 1
