-- register: a worker process takes a name.
--
-- ARGV: worker, instance, lease_ms, info_json, takeover, then field/value pairs (host,
-- pid, capacity). takeover: the instance id of a previous owner that the caller has
-- verified to be dead (same host, its pid gone), so a worker restarted after a
-- crash gets its name and tasks back at once instead of after the lease.
--
-- Invariants: a name is unique while its owner is alive (heartbeat within its
-- own lease): a second process asking for a live name is refused, so two
-- processes can never renew or complete each other's leases. A restarted
-- worker (same name, owner dead or stopped) takes the name over together with
-- its predecessor's leases: it gets them back so it can re-adopt tasks that
-- kept running, report those that ended meanwhile, and requeue (fenced, with the
-- token) only those truly gone.
-- Returns: {"ok", then per held task: id, token, attempt, spec, mem, claimed_at} or an
-- error reply NAMETAKEN.
local worker, instance, lease_ms, info, takeover =
  ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local wk = worker_key(worker)
local now = now_ms()
restart_time(now)
local old = redis.call('HMGET', wk, 'instance', 'heartbeat', 'state', 'lease_ms')
-- The old owner is alive while its own lease (not ours) has not run out.
local old_lease = tonumber(old[4] or lease_ms)
if old[1] and old[1] ~= instance and old[1] ~= takeover and old[3] ~= 'stopped'
    and tonumber(old[2] or '0') > now - old_lease then
  return redis.error_reply('NAMETAKEN worker name ' .. worker ..
    ' is held by a live worker (heartbeat ' .. (now - tonumber(old[2])) .. ' ms ago)')
end
local held = {}
for _, tid in ipairs(redis.call('SMEMBERS', wtasks_key(worker))) do
  local f = redis.call('HMGET', task_key(tid), 'state', 'worker', 'token', 'attempt', 'spec',
    'mem', 'claimed_at')
  if f[1] == 'running' and f[2] == worker then
    for _, v in ipairs({tid, f[3], f[4], f[5], f[6], f[7]}) do held[#held + 1] = v end
  else
    redis.call('SREM', wtasks_key(worker), tid)
  end
end
redis.call('DEL', wk)
redis.call('HSET', wk, 'name', worker, 'instance', instance, 'state', 'running',
  'started_at', int(now), 'heartbeat', int(now), 'lease_ms', int(lease_ms), 'info', info,
  unpack(ARGV, 6))
redis.call('ZADD', P .. 'workers', int(now), worker)
redis.call('XADD', P .. 'events', 'MAXLEN', '~', 10000, '*', 'type', 'worker_up',
  'worker', worker)
local out = {'ok'}
for _, v in ipairs(held) do out[#out + 1] = v end
return out
