-- Shared helpers, prepended to every transition script when it is loaded.
--
-- KEYS[1] is the queue prefix, e.g. "dc:{default}:". Every key a script touches
-- is built from it, so all keys of a queue share one hash tag (one cluster
-- slot) and the key layout is written down once, in store.py and here.
--
-- Times are milliseconds from the Redis server's clock (TIME), never a
-- worker's: a hundred nodes never agree on the time, the server does.
local P = KEYS[1]

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function int(x)
  return string.format('%d', x)
end

local function task_key(tid) return P .. 'task:' .. tid end
local function job_key(jid) return P .. 'job:' .. jid end
local function ready_key(shape) return P .. 'ready:' .. shape end
local function wtasks_key(worker) return P .. 'worker:' .. worker .. ':tasks' end
local function worker_key(worker) return P .. 'worker:' .. worker end

-- Per-state counters live beside the job record and queue-wide, and move in
-- the same script as the state itself: `status` is two HGETALLs, never a scan.
local function move(job, from, to)
  if from then
    redis.call('HINCRBY', job_key(job), 'n_' .. from, -1)
    redis.call('HINCRBY', P .. 'counts', from, -1)
  end
  if to then
    redis.call('HINCRBY', job_key(job), 'n_' .. to, 1)
    redis.call('HINCRBY', P .. 'counts', to, 1)
  end
end

-- Every transition is told on the queue's event stream (watch, dashboard). A
-- task's final outcome is also told on the stream of the client that asked to
-- be notified at submit (field `notify`): a client's futures then wake for its
-- own tasks' outcomes alone, not for every event of the queue. That stream
-- lives a day after its last entry, for a client that went away unannounced.
local FINAL = {succeeded = true, failed = true, cancelled = true}
local function event(kind, tid, ...)
  redis.call('XADD', P .. 'events', 'MAXLEN', '~', 10000, '*', 'type', kind, 'task', tid, ...)
  if FINAL[kind] then
    local who = redis.call('HGET', task_key(tid), 'notify')
    if who then
      local key = P .. 'notify:' .. who
      redis.call('XADD', key, 'MAXLEN', '~', 10000, '*', 'type', kind, 'task', tid, ...)
      redis.call('PEXPIRE', key, 86400000)
    end
  end
end

-- Put a task (state already chosen by the caller) back into its ready set.
local function make_ready(tid, shape, score)
  redis.call('ZADD', ready_key(shape), score, tid)
  redis.call('SADD', P .. 'shapes', shape)
end

-- Drop a running task's lease: it leaves the lease index and its worker's set.
local function drop_lease(tid, worker)
  redis.call('ZREM', P .. 'running', tid)
  if worker and worker ~= '' then
    redis.call('SREM', wtasks_key(worker), tid)
  end
  redis.call('HDEL', task_key(tid), 'token', 'deadline')
end

-- running -> queued without counting a failure (preemption, release, lost lease).
local function requeue_running(tid, reason, counter)
  local tk = task_key(tid)
  local f = redis.call('HMGET', tk, 'job', 'worker', 'shape', 'score')
  drop_lease(tid, f[2])
  redis.call('HSET', tk, 'state', 'queued', 'reason', reason, 'worker', '')
  if counter then redis.call('HINCRBY', tk, counter, 1) end
  move(f[1], 'running', 'queued')
  make_ready(tid, f[3], f[4])
  return f
end

-- When this queue first saw the current Redis process (its run_id, from INFO):
-- every script that decides on or records liveness (claim, renew, reap,
-- register) calls this first, so a heartbeat older than the returned time was
-- sent before the restart and any later one after it, exactly.
local function restart_time(now)
  local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
  local f = redis.call('HMGET', P .. 'server', 'run_id', 'started')
  if f[1] ~= run_id then
    redis.call('HSET', P .. 'server', 'run_id', run_id, 'started', int(now))
    return now
  end
  return tonumber(f[2])
end

-- Move retries whose delay has passed into their ready sets.
local function promote_due(now)
  local due = redis.call('ZRANGEBYSCORE', P .. 'delayed', '-inf', now, 'LIMIT', 0, 100)
  for _, tid in ipairs(due) do
    redis.call('ZREM', P .. 'delayed', tid)
    local f = redis.call('HMGET', task_key(tid), 'shape', 'score', 'state')
    if f[3] == 'queued' then make_ready(tid, f[1], f[2]) end
  end
end

-- Take a queued task out of wherever it waits (its ready set or the delayed set).
local function unqueue(tid, shape)
  redis.call('ZREM', ready_key(shape), tid)
  if redis.call('ZCARD', ready_key(shape)) == 0 then redis.call('SREM', P .. 'shapes', shape) end
  redis.call('ZREM', P .. 'delayed', tid)
end

-- running -> failed, for every script that ends a task unsuccessfully.
local function finish_failed(tid, job, worker, reason, now)
  drop_lease(tid, worker)
  redis.call('HSET', task_key(tid), 'state', 'failed', 'reason', reason, 'finished_at', int(now))
  redis.call('ZADD', P .. 'failed', int(now), tid)
  move(job, 'running', 'failed')
  event('failed', tid, 'worker', worker or '', 'reason', reason)
end

-- Is some live worker big enough for a task needing `mem` bytes?
local function any_worker_fits(mem, now)
  for _, w in ipairs(redis.call('ZRANGEBYSCORE', P .. 'workers', now - 3600000, '+inf')) do
    local f = redis.call('HMGET', worker_key(w), 'mem', 'heartbeat', 'lease_ms', 'state')
    if f[4] ~= 'stopped' and tonumber(f[2] or '0') + tonumber(f[3] or '0') >= now
        and tonumber(f[1] or '0') >= mem then
      return true
    end
  end
  return false
end

local function wake()
  redis.call('PUBLISH', P .. 'wake', '1')
end

-- Record that a completion arrived with a token that no longer owns the task.
-- It is kept (counted and in the event stream) but never applied.
local function reject_stale(tid, token, what)
  redis.call('HINCRBY', P .. 'counts', 'stale_reports', 1)
  event('stale', tid, 'token', token, 'report', what)
end
