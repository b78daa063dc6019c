-- submit: (nothing) -> queued, for a whole batch at once.
--
-- ARGV: job_name, source, dedup mode, default_retries ("" = the queue's
-- ``config`` default), job_id, notify (a client id whose stream hears each
-- task's final outcome, see `event`; "" for none), then 8 fields per
-- task: dedup_key, priority, mem, cpus, gpus, shape, spec_json, retries ("" =
-- queue default). Dedup mode: "0" a task whose key is known is not created again,
-- "1" it is (allow duplicates; keys still recorded), "2" keys are neither looked
-- up nor recorded (API calls: each is unique, and recording them would grow the
-- dedup hash without end). job_id "" makes a new job; else the tasks are added
-- to that job (ids continue after its last task), which must exist.
--
-- Invariants: all-or-nothing (one script); a task whose dedup key is already
-- known is not created again in mode 0, and its existing id is returned instead
-- (this holds within the batch too: the first of two equal tasks is created,
-- the second gets its id); a new job record and its counters are created only
-- when at least one task is new. Ready-set score = -priority *
-- 1e12 + sequence, so a ZRANGE head is the highest priority, then the oldest.
--
-- Cost: a file of 100,000 tasks is one call, so the per-task work is kept to
-- one HSET of the task record; dedup lookups (HMGET), dedup entries (HSET),
-- ready-set inserts (ZADD per shape), the sequence (INCRBY) and the counters
-- (HINCRBY) are done once per chunk or once per batch. Redis runs the script
-- alone, so batching these changes no outcome.
-- Returns: {job_id or "", n_new, id_1, ..., id_n} with one id per input task.
local job_name, source, mode, default_retries = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local allow_dup, no_dedup = mode ~= '0', mode == '2'
if default_retries == '' then
  default_retries = redis.call('HGET', P .. 'config', 'default_retries') or '0'
end
local now = int(now_ms())
local H = 6  -- header fields before the tasks'
local notify = ARGV[6]
local n = (#ARGV - H) / 8
local CHUNK = 1000  -- keys per HMGET/HSET/ZADD call: well below Lua's unpack limit
local ids = {}
local jid = nil
local base = 0  -- tasks the job had before this batch
local idx = 0   -- tasks made by this batch
if ARGV[5] ~= '' then
  jid = ARGV[5]
  local had = redis.call('HGET', job_key(jid), 'n_tasks')
  if not had then return redis.error_reply('NOJOB ' .. jid) end
  base = tonumber(had)
end
local dedup = P .. 'dedup'
local seq0 = tonumber(redis.call('GET', P .. 'seq:task') or '0')
local seen = {}       -- dedup key -> id of a task created earlier in this batch
local new_dedup = {}  -- key, id, key, id... written once at the end
local ready = {}      -- shape -> {score, id, score, id...}

local function flush(cmd, key, flat)
  for i = 1, #flat, 2 * CHUNK do
    redis.call(cmd, key, unpack(flat, i, math.min(i + 2 * CHUNK - 1, #flat)))
  end
end

for c = 0, n - 1, CHUNK do
  local last = math.min(c + CHUNK, n) - 1
  local known = {}
  if not no_dedup then
    local keys = {}
    for i = c, last do keys[#keys + 1] = ARGV[H + 1 + i * 8] end
    known = redis.call('HMGET', dedup, unpack(keys))
  end
  for i = c, last do
    local b = H + 1 + i * 8
    local key = ARGV[b]
    local existing = nil
    if not no_dedup then existing = known[i - c + 1] or seen[key] end
    if existing and not allow_dup then
      ids[#ids + 1] = existing
    else
      if not jid then
        jid = tostring(redis.call('INCR', P .. 'seq:job'))
        redis.call('HSET', job_key(jid), 'id', jid, 'name', job_name, 'source', source,
          'submitted_at', now, 'n_tasks', 0)
        redis.call('ZADD', P .. 'jobs', jid, jid)
      end
      idx = idx + 1
      local tid = jid .. '.' .. (base + idx)
      local score = int(-tonumber(ARGV[b + 1]) * 1e12 + seq0 + idx)
      local retries = ARGV[b + 7]
      if retries == '' then retries = default_retries end
      local shape = ARGV[b + 5]
      redis.call('HSET', task_key(tid), 'id', tid, 'job', jid, 'state', 'queued',
        'prio', ARGV[b + 1], 'mem', ARGV[b + 2], 'declared_mem', ARGV[b + 2],
        'cpus', ARGV[b + 3], 'gpus', ARGV[b + 4], 'shape', shape, 'spec', ARGV[b + 6],
        'retries', retries, 'score', score, 'attempt', 0, 'fails', 0, 'submitted_at', now)
      if notify ~= '' then redis.call('HSET', task_key(tid), 'notify', notify) end
      if not existing and not no_dedup then
        seen[key] = tid
        new_dedup[#new_dedup + 1] = key
        new_dedup[#new_dedup + 1] = tid
      end
      local members = ready[shape]
      if not members then
        members = {}
        ready[shape] = members
      end
      members[#members + 1] = score
      members[#members + 1] = tid
      ids[#ids + 1] = tid
    end
  end
end
if idx > 0 then
  redis.call('INCRBY', P .. 'seq:task', idx)
  flush('HSET', dedup, new_dedup)
  for shape, members in pairs(ready) do
    flush('ZADD', ready_key(shape), members)
    redis.call('SADD', P .. 'shapes', shape)
  end
  redis.call('HINCRBY', job_key(jid), 'n_queued', idx)
  redis.call('HINCRBY', P .. 'counts', 'queued', idx)
  redis.call('HSET', job_key(jid), 'n_tasks', base + idx)
  redis.call('XADD', P .. 'events', 'MAXLEN', '~', 10000, '*', 'type', 'submit', 'job', jid,
    'tasks', idx)
  wake()
end
if idx == 0 then jid = nil end
local out = {jid or '', idx}
for _, id in ipairs(ids) do out[#out + 1] = id end
return out
