-- reap: running -> queued for every task whose lease expired (its worker died).
--
-- ARGV: lock_ms, max_lost, batch
--
-- After a Redis restart, deadlines that passed while the server was down say
-- nothing about the workers: no lease is reaped until its holder has had one
-- full lease period since the restart to renew.
--
-- Idempotent and safe for any participant to run: it acts only on leases whose
-- deadline (server clock) has passed, and a short lock makes concurrent reapers
-- return at once instead of repeating the work. A task whose worker was lost
-- more than max_lost times fails ("lost its worker N times") instead of looping
-- forever, e.g. a task that kills every node it lands on.
-- Returns: number of tasks reaped, or -1 if another reaper holds the lock.
local lock_ms, max_lost, batch = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if not redis.call('SET', P .. 'lock:reap', '1', 'NX', 'PX', lock_ms) then
  return -1
end
local now = now_ms()
local restarted = restart_time(now)
local expired = redis.call('ZRANGEBYSCORE', P .. 'running', '-inf', now, 'LIMIT', 0, batch)
local reaped = 0
for _, tid in ipairs(expired) do
  local tk = task_key(tid)
  local f = redis.call('HMGET', tk, 'state', 'worker', 'job', 'lost', 'lease_ms')
  if f[1] == 'running' and now < restarted + tonumber(f[5] or '0') then
    -- within the grace after a restart: leave it for its worker to renew
  elseif f[1] ~= 'running' then
    redis.call('ZREM', P .. 'running', tid)
  else
    local lost = tonumber(f[4] or '0') + 1
    local reason = 'lease expired: worker ' .. (f[2] or '?') .. ' stopped renewing'
    if lost > max_lost then
      redis.call('HSET', tk, 'lost', lost)
      finish_failed(tid, f[3], f[2], 'lost its worker ' .. lost .. ' times; last: ' .. reason, now)
    else
      requeue_running(tid, reason, 'lost')
      event('reaped', tid, 'worker', f[2] or '')
    end
    reaped = reaped + 1
  end
end
if reaped > 0 then wake() end
return reaped
