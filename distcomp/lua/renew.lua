-- renew: extend every lease a worker holds, in one call per heartbeat.
--
-- ARGV: worker, instance, lease_ms, info_json, then task_id/token pairs.
--
-- Invariants: only the registered instance of a name may renew (two processes
-- can never renew each other's leases); a lease is extended only while the task
-- is running under that token. The heartbeat time is the server's clock.
--
-- Re-take: a task this worker still runs but that Redis shows as queued (its
-- lease was reaped during a partition and nobody has claimed it yet, or the
-- server lost the claim in a crash) is taken back under the worker's token, so
-- the running copy continues instead of being killed and run again. A queued
-- task is held by nobody, so this never creates a second live attempt.
-- Returns: the ids whose lease is no longer this worker's (cancelled, reaped,
-- taken over): the worker must stop its local copy.
local worker, instance, lease_ms, info = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local wk = worker_key(worker)
if redis.call('HGET', wk, 'instance') ~= instance then
  return redis.error_reply('NOTOWNER worker name ' .. worker .. ' is registered to another process')
end
local now = now_ms()
restart_time(now)
redis.call('HSET', wk, 'heartbeat', int(now), 'info', info)
redis.call('ZADD', P .. 'workers', int(now), worker)
local deadline = int(now + lease_ms)
local lost = {}
for i = 5, #ARGV, 2 do
  local tid, token = ARGV[i], ARGV[i + 1]
  local tk = task_key(tid)
  local f = redis.call('HMGET', tk, 'state', 'token', 'job', 'shape')
  if f[1] == 'running' and f[2] == token then
    redis.call('HSET', tk, 'deadline', deadline)
    redis.call('ZADD', P .. 'running', deadline, tid)
  elseif f[1] == 'queued' then
    unqueue(tid, f[4])
    redis.call('HSET', tk, 'state', 'running', 'worker', worker, 'token', token,
      'deadline', deadline, 'lease_ms', int(lease_ms))
    redis.call('ZADD', P .. 'running', deadline, tid)
    redis.call('SADD', wtasks_key(worker), tid)
    move(f[3], 'queued', 'running')
    event('retaken', tid, 'worker', worker)
  else
    lost[#lost + 1] = tid
  end
end
return lost
