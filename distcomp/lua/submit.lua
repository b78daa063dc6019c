-- submit: (nothing) -> queued, for a whole batch at once.
--
-- ARGV: job_name, source, allow_duplicates (0|1), default_retries, then 8 fields
-- per task: dedup_key, priority, mem, cpus, gpus, shape, spec_json, retries ("" =
-- queue default).
--
-- Invariants: all-or-nothing (one script); a task whose dedup key is already
-- known is not created again unless allow_duplicates, and its existing id is
-- returned instead; the job record and its counters are created only when at
-- least one task is new. Ready-set score = -priority * 1e12 + sequence, so a
-- ZRANGE head is the highest priority, then the oldest.
-- Returns: {job_id or "", n_new, id_1, ..., id_n} with one id per input task.
local job_name, source, allow_dup, default_retries = ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4]
local now = now_ms()
local n = (#ARGV - 4) / 8
local ids = {}
local jid = nil
local idx = 0
local dedup = P .. 'dedup'
for i = 0, n - 1 do
  local b = 5 + i * 8
  local key = ARGV[b]
  local existing = redis.call('HGET', dedup, key)
  if existing and not allow_dup then
    ids[#ids + 1] = existing
  else
    if not jid then
      jid = tostring(redis.call('INCR', P .. 'seq:job'))
      redis.call('HSET', job_key(jid), 'id', jid, 'name', job_name, 'source', source,
        'submitted_at', int(now), 'n_tasks', 0)
      redis.call('ZADD', P .. 'jobs', jid, jid)
    end
    idx = idx + 1
    local tid = jid .. '.' .. idx
    local seq = redis.call('INCR', P .. 'seq:task')
    local prio = tonumber(ARGV[b + 1])
    local score = int(-prio * 1e12 + seq)
    local retries = ARGV[b + 7]
    if retries == '' then retries = default_retries end
    redis.call('HSET', task_key(tid), 'id', tid, 'job', jid, 'state', 'queued',
      'prio', ARGV[b + 1], 'mem', ARGV[b + 2], 'declared_mem', ARGV[b + 2], 'cpus', ARGV[b + 3],
      'gpus', ARGV[b + 4], 'shape', ARGV[b + 5], 'spec', ARGV[b + 6], 'retries', retries,
      'score', score, 'attempt', 0, 'fails', 0, 'submitted_at', int(now))
    if not existing then redis.call('HSET', dedup, key, tid) end
    make_ready(tid, ARGV[b + 5], score)
    move(jid, nil, 'queued')
    ids[#ids + 1] = tid
  end
end
if jid then
  redis.call('HSET', job_key(jid), 'n_tasks', idx)
  redis.call('XADD', P .. 'events', 'MAXLEN', '~', 10000, '*', 'type', 'submit', 'job', jid,
    'tasks', idx)
  wake()
end
local out = {jid or '', idx}
for _, id in ipairs(ids) do out[#out + 1] = id end
return out
