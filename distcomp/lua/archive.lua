-- archive: succeeded | failed | cancelled -> gone from Redis (history trimming).
--
-- ARGV: lock_token, min_age_ms, states ("succeeded,failed,cancelled": which may
-- go), label (where the records were written: "host:/path/history.jsonl", or ""
-- when they only expire), then task_id / finished_at pairs that the caller read
-- from the per-state indexes (`succeeded`, `failed`, `cancelled`: sorted sets of
-- finished task ids by finish time) and, in archive mode, wrote to the archive
-- file (fsynced) before this call.
--
-- Cost: O(batch * log N): only the named tasks are looked at; nothing is scanned.
--
-- Invariants:
-- * Only a task that is still finished in one of the given states, with exactly
--   the finished_at the caller read, finished at least min_age_ms ago by the
--   server clock, is removed. A task retried between the caller's read and this
--   call (queued or running again, or even finished again: a new finished_at) is
--   left alone, so nothing live and no unarchived record is ever deleted.
-- * Every key of the task goes in the same step: its hash, its entry in its
--   state index, its python payload. Its dedup entry stays (about 100 bytes), so
--   submitting the same spec again still does not run it again.
-- * The per-state counters (n_<state> of the job, the queue's counts) do not
--   move: they count tasks that ever reached the state. trimmed_<state> of the
--   job and of the queue count the removed ones, so for every state
--   n_<state> = tasks of that state still in Redis + trimmed_<state>, exactly.
--   The job remembers the latest non-empty label as `archive` and counts the
--   tasks that left without one as `expired`: with its n_tasks and trimmed_*
--   this tells "archived" (or "expired") from "unknown task" for an id, in one
--   read.
-- * One trimmer at a time: the caller took lock:history with lock_token (SET NX
--   PX) before reading; if the lock expired and another trimmer holds it now,
--   nothing is done (-1). The lock is released here.
-- Returns: number of tasks removed, or -1 if the caller no longer holds the lock.
local token, min_age, label = ARGV[1], tonumber(ARGV[2]), ARGV[4]
local lock = P .. 'lock:history'
if redis.call('GET', lock) ~= token then return -1 end
local allowed = {}
for state in string.gmatch(ARGV[3], '[^,]+') do allowed[state] = true end
local cutoff = now_ms() - min_age
local removed = 0

-- The payload of a python task is a key of this queue named in its spec.
local function payload_of(spec)
  local ok, decoded = pcall(cjson.decode, spec or '')
  if not ok or type(decoded) ~= 'table' or type(decoded.payload) ~= 'string' then return nil end
  if string.sub(decoded.payload, 1, #P) ~= P then return nil end
  return decoded.payload
end

for i = 5, #ARGV - 1, 2 do
  local tid, read_at = ARGV[i], ARGV[i + 1]
  local tk = task_key(tid)
  local f = redis.call('HMGET', tk, 'state', 'finished_at', 'job', 'spec')
  local at = tonumber(f[2] or '')
  if f[1] and allowed[f[1]] and f[2] == read_at and at and at <= cutoff then
    local payload = payload_of(f[4])
    if payload then redis.call('DEL', payload) end
    redis.call('DEL', tk)
    redis.call('ZREM', P .. f[1], tid)
    redis.call('HINCRBY', job_key(f[3]), 'trimmed_' .. f[1], 1)
    if label ~= '' then
      redis.call('HSET', job_key(f[3]), 'archive', label)
    else
      redis.call('HINCRBY', job_key(f[3]), 'expired', 1)
    end
    redis.call('HINCRBY', P .. 'counts', 'trimmed_' .. f[1], 1)
    removed = removed + 1
  end
end
redis.call('DEL', lock)
if removed > 0 then
  redis.call('XADD', P .. 'events', 'MAXLEN', '~', 10000, '*', 'type', 'trimmed',
    'count', removed, 'archive', label)
end
return removed
