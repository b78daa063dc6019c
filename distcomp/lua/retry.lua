-- retry: failed|cancelled -> queued, on request.
--
-- ARGV: task ids.
--
-- Invariants: only finished-unsuccessfully tasks move; their failure count and
-- exclusions are reset (a fresh budget of retries), they keep their place in line
-- (original score), and counters move in the same step.
-- Returns: number of tasks requeued.
local n = 0
for i = 1, #ARGV do
  local tid = ARGV[i]
  local tk = task_key(tid)
  local f = redis.call('HMGET', tk, 'state', 'job', 'shape', 'score')
  if f[1] == 'failed' or f[1] == 'cancelled' then
    redis.call('ZREM', P .. f[1], tid)  -- the failed or cancelled index
    redis.call('HSET', tk, 'state', 'queued', 'fails', 0, 'lost', 0, 'excl', '|',
      'reason', 'retried (was ' .. f[1] .. ')')
    move(f[2], f[1], 'queued')
    make_ready(tid, f[3], f[4])
    event('requeue', tid, 'reason', 'retry')
    n = n + 1
  end
end
if n > 0 then wake() end
return n
