-- register: a worker process takes a name.
--
-- ARGV: worker, instance, lease_ms, info_json, then field/value pairs (host, pid, capacity).
--
-- Invariants: a name is unique while its owner is alive (heartbeat within one
-- lease): a second process asking for a live name is refused, so two processes
-- can never renew or complete each other's leases. A restarted worker (same
-- name, owner dead or stopped) takes the name over and its predecessor's
-- running tasks go back to the queue at once instead of after lease expiry.
-- Returns: {status, n_requeued}; status "ok" or an error reply NAMETAKEN.
local worker, instance, lease_ms, info = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local wk = worker_key(worker)
local now = now_ms()
local old = redis.call('HMGET', wk, 'instance', 'heartbeat', 'state', 'lease_ms')
-- The old owner is alive while its own lease (not ours) has not run out.
local old_lease = tonumber(old[4] or lease_ms)
if old[1] and old[1] ~= instance and old[3] ~= 'stopped'
    and tonumber(old[2] or '0') > now - old_lease then
  return redis.error_reply('NAMETAKEN worker name ' .. worker ..
    ' is held by a live worker (heartbeat ' .. (now - tonumber(old[2])) .. ' ms ago)')
end
local requeued = 0
for _, tid in ipairs(redis.call('SMEMBERS', wtasks_key(worker))) do
  local f = redis.call('HMGET', task_key(tid), 'state', 'worker')
  if f[1] == 'running' and f[2] == worker then
    requeue_running(tid, 'worker ' .. worker .. ' restarted', 'lost')
    event('requeue', tid, 'reason', 'worker restarted')
    requeued = requeued + 1
  else
    redis.call('SREM', wtasks_key(worker), tid)
  end
end
redis.call('DEL', wk)
redis.call('HSET', wk, 'name', worker, 'instance', instance, 'state', 'running',
  'started_at', int(now), 'heartbeat', int(now), 'lease_ms', int(lease_ms), 'info', info,
  unpack(ARGV, 5))
redis.call('ZADD', P .. 'workers', int(now), worker)
redis.call('XADD', P .. 'events', 'MAXLEN', '~', 10000, '*', 'type', 'worker_up',
  'worker', worker)
if requeued > 0 then wake() end
return {'ok', requeued}
