-- deregister: a worker stops cleanly.
--
-- ARGV: worker, instance
--
-- Invariants: only the registered instance may mark its name stopped; a worker
-- hands its tasks back (requeue) before it deregisters, so any task still in its
-- set here is requeued rather than left to wait for lease expiry.
-- Returns: number of tasks requeued.
local worker, instance = ARGV[1], ARGV[2]
local wk = worker_key(worker)
if redis.call('HGET', wk, 'instance') ~= instance then return 0 end
local n = 0
for _, tid in ipairs(redis.call('SMEMBERS', wtasks_key(worker))) do
  local f = redis.call('HMGET', task_key(tid), 'state', 'worker')
  if f[1] == 'running' and f[2] == worker then
    requeue_running(tid, 'worker ' .. worker .. ' stopped', nil)
    n = n + 1
  end
end
redis.call('DEL', wtasks_key(worker))
redis.call('HSET', wk, 'state', 'stopped', 'stopped_at', int(now_ms()))
-- A stopped worker holds nothing: it must not count as "alive before a restart".
redis.call('ZADD', P .. 'workers', 0, worker)
redis.call('XADD', P .. 'events', 'MAXLEN', '~', 10000, '*', 'type', 'worker_down',
  'worker', worker)
if n > 0 then wake() end
return n
