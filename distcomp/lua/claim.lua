-- claim: queued -> running, up to max_count tasks that fit the worker's free resources.
--
-- ARGV: worker, instance, free_mem, free_cpus, free_gpus, max_count, lease_ms, nonce,
-- free custom resources ("license=2;disk=1", "" for none), and optionally the most
-- memory and cpus any one task may need (a worker that prefetches asks with more
-- than is free now, but never for a task larger than itself; "" = no such cap)
--
-- Cost: O(shapes * log N). Ready tasks sit in one sorted set per resource shape
-- ("m<mem floor MiB>:c<cpus>:g<gpus>"); the script looks only at the heads of the
-- shapes whose cpus/gpus/memory floor fit, checks the head's exact memory, takes
-- the best score, and repeats. A task that failed on this worker is passed over
-- while some other live worker has not failed it (only the few heads inspected
-- are checked), so exclusions never turn a claim into a scan.
--
-- Restart freeze: right after a Redis restart, a worker that was alive before it
-- may hold tasks whose claim the server lost (AOF everysec after a machine
-- crash). Until every such worker has renewed once (renew re-takes its tasks)
-- or a lease has passed, nothing is claimed, so no task gets a second live
-- attempt. A fresh server with no recently-alive workers does not freeze.
--
-- Retries waiting out their delay sit in the "delayed" set; the due ones are
-- moved into their ready sets first (O(log N + due)).
--
-- Invariants: the caller must be the registered instance of its name; each
-- claimed task gets a fresh lease token (a counter plus the caller's random
-- nonce, so a counter that went back after a restart never repeats a token) and a deadline
-- from the server clock, enters the lease index and the worker's task set, and
-- its counters move queued -> running in the same step.
-- Returns: {drained, then task_id, token, attempt, spec_json, mem per claimed task}
-- (mem: the current requirement, which the memory guard may have raised).
-- drained is 1 when nothing at all is left ready after this claim (no ready set,
-- no retry waiting out its delay): until something is submitted or requeued,
-- which publishes a wake, claiming again would find nothing, whatever frees up.
local worker, instance = ARGV[1], ARGV[2]
local free_mem, free_cpus, free_gpus = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local max_count, lease_ms = tonumber(ARGV[6]), tonumber(ARGV[7])
local nonce = ARGV[8]
local cap_mem = tonumber(ARGV[10] or '') or math.huge
local cap_cpus = tonumber(ARGV[11] or '') or math.huge
-- Custom named resources: a shape may end in ":r<name>=<n>;<name>=<n>".
local function parse_resources(text)
  local t = {}
  for name, n in string.gmatch(text or '', '([%w_.%-]+)=(%d+)') do t[name] = tonumber(n) end
  return t
end
local free_res = parse_resources(ARGV[9])
local function resources_fit(needs)
  for name, n in pairs(needs) do
    if (free_res[name] or 0) < n then return false end
  end
  return true
end
if redis.call('HGET', worker_key(worker), 'instance') ~= instance then
  return redis.error_reply('NOTOWNER worker name ' .. worker .. ' is registered to another process')
end
local now = now_ms()
local restarted = restart_time(now)
if now < restarted + lease_ms then
  local unrenewed = redis.call('ZRANGEBYSCORE', P .. 'workers', '(' .. int(restarted - lease_ms),
    '(' .. int(restarted), 'LIMIT', 0, 1)
  if #unrenewed > 0 then return {0} end
end
promote_due(now)
local HEAD_SCAN = 8
local live = nil  -- live workers, computed only if an excluded head is met

local function excluded(tid)
  local excl = redis.call('HGET', task_key(tid), 'excl')
  if not excl or not string.find(excl, '|' .. worker .. '|', 1, true) then return false end
  if not live then
    live = redis.call('ZRANGEBYSCORE', P .. 'workers', now - lease_ms, '+inf')
  end
  for _, w in ipairs(live) do
    if w ~= worker and not string.find(excl, '|' .. w .. '|', 1, true) then return true end
  end
  return false
end

local out = {0}
local shapes = redis.call('SMEMBERS', P .. 'shapes')
for _ = 1, max_count do
  local best_tid, best_score, best_shape, best_mem = nil, nil, nil, nil
  for _, shape in ipairs(shapes) do
    local m, c, g, rest = string.match(shape, '^m(%d+):c(%d+):g(%d+):?r?(.*)$')
    m, c, g = tonumber(m) * 1048576, tonumber(c), tonumber(g)
    if c <= free_cpus and c <= cap_cpus and g <= free_gpus and m <= free_mem and m <= cap_mem
        and (rest == '' or resources_fit(parse_resources(rest))) then
      local head = redis.call('ZRANGE', ready_key(shape), 0, HEAD_SCAN - 1, 'WITHSCORES')
      for i = 1, #head, 2 do
        local tid, score = head[i], tonumber(head[i + 1])
        if best_score and score >= best_score then break end
        if not excluded(tid) then
          local mem = tonumber(redis.call('HGET', task_key(tid), 'mem'))
          if mem <= free_mem and mem <= cap_mem then
            best_tid, best_score, best_shape, best_mem = tid, score, shape, mem
          end
          break
        end
      end
    end
  end
  if not best_tid then break end
  local rk = ready_key(best_shape)
  redis.call('ZREM', rk, best_tid)
  if redis.call('ZCARD', rk) == 0 then
    redis.call('SREM', P .. 'shapes', best_shape)
  end
  local tk = task_key(best_tid)
  local token = redis.call('INCR', P .. 'seq:lease') .. '-' .. nonce
  local attempt = redis.call('HINCRBY', tk, 'attempt', 1)
  local deadline = now + lease_ms
  redis.call('HSET', tk, 'state', 'running', 'worker', worker, 'token', token,
    'deadline', int(deadline), 'claimed_at', int(now), 'lease_ms', int(lease_ms))
  redis.call('ZADD', P .. 'running', int(deadline), best_tid)
  redis.call('SADD', wtasks_key(worker), best_tid)
  local f = redis.call('HMGET', tk, 'job', 'spec', 'cpus', 'gpus')
  move(f[1], 'queued', 'running')
  event('claim', best_tid, 'worker', worker, 'attempt', attempt)
  out[#out + 1] = best_tid
  out[#out + 1] = token
  out[#out + 1] = attempt
  out[#out + 1] = f[2]
  out[#out + 1] = best_mem
  free_mem = free_mem - best_mem
  free_cpus = free_cpus - tonumber(f[3])
  free_gpus = free_gpus - tonumber(f[4])
  for name, n in pairs(parse_resources(string.match(best_shape, ':r(.*)$'))) do
    free_res[name] = free_res[name] - n
  end
end
if redis.call('SCARD', P .. 'shapes') == 0 and redis.call('ZCARD', P .. 'delayed') == 0 then
  out[1] = 1
end
return out
