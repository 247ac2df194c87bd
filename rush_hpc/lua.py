"""Lua scripts for the state changes that must be atomic (one round trip each).

Each header documents KEYS and ARGV. Task ids travel in ARGV and the scripts derive the task hash
key as ``task_prefix .. id``; every such key shares the network's hash tag, so this is safe in a
Redis Cluster slot.

Ownership is fenced here, not in the client: every script a worker calls to change a task first
checks that the worker's state is "running" (a lost, killed, ended or reset worker is refused with
the error ``RUSH_NOT_RUNNING <state>``), and finishing or failing a task also checks that the task is
held by that worker (its ``worker:<id>:tasks`` set). Every script is safe to re-send after a lost
reply: task ids are made by the client, so a repeated creation finds them and skips them; a pop
carries a request id and a repeat returns the same task; a repeated finish or fail finds the task
already finished or failed by the same worker and reports it done, not discarded.
"""

# Refuse a worker that is not running. Expects `worker_key` (the worker's hash).
_REQUIRE_RUNNING = """
local function require_running(worker_key)
  local state = redis.call('HGET', worker_key, 'state')
  if state ~= 'running' then
    return redis.error_reply('RUSH_NOT_RUNNING ' .. (state or 'gone'))
  end
  return nil
end
"""

# Requeue a running task (retries left, at the front of the queue) or fail it with `condition`.
# The caller already removed it from the running set and from its holder's set.
_RELEASE_TASK = """
local function release_task(key, id, queued, failed, condition, requeued_ids, failed_ids)
  local max_retries = tonumber(redis.call('HGET', key, 'max_retries') or '0') or 0
  local n_retries = tonumber(redis.call('HGET', key, 'n_retries') or '0') or 0
  if n_retries < max_retries then
    redis.call('HINCRBY', key, 'n_retries', 1)
    redis.call('HSET', key, 'state', 'queued')
    redis.call('LPUSH', queued, id)
    requeued_ids[#requeued_ids + 1] = id
  else
    redis.call('HSET', key, 'state', 'failed', 'condition', condition)
    redis.call('RPUSH', failed, id)
    failed_ids[#failed_ids + 1] = id
  end
end
"""

# Create tasks, queued or running (held by the creating worker). Ids already present are skipped,
# so a re-sent call creates nothing twice.
# KEYS[1] all-tasks list, KEYS[2] running set or the queue (list) to append to,
# KEYS[3] the creating worker's hash, KEYS[4] its held-tasks set (both unused when ARGV[3] == '')
# ARGV[1] task key prefix, ARGV[2] 'running' or 'queued', ARGV[3] creating worker id ('' = controller),
# ARGV[4] max_retries ('' for none), then triples: id, xs (encoded), xs_extra (encoded or '')
# returns the number of tasks created
CREATE_TASKS = _REQUIRE_RUNNING + """
if ARGV[3] ~= '' then
  local refused = require_running(KEYS[3])
  if refused then return refused end
end
local running = ARGV[2] == 'running'
local created = {}
for i = 5, #ARGV, 3 do
  local id = ARGV[i]
  local key = ARGV[1] .. id
  if redis.call('EXISTS', key) == 0 then
    redis.call('HSET', key, 'xs', ARGV[i + 1], 'state', ARGV[2])
    if ARGV[i + 2] ~= '' then redis.call('HSET', key, 'xs_extra', ARGV[i + 2]) end
    if ARGV[4] ~= '' then redis.call('HSET', key, 'max_retries', ARGV[4]) end
    if running then redis.call('HSET', key, 'worker_id', ARGV[3]) end
    created[#created + 1] = id
  end
end
local function add_all(command, key)  -- in slices: unpack() has a limit on its results
  for first = 1, #created, 4000 do
    redis.call(command, key, unpack(created, first, math.min(first + 3999, #created)))
  end
end
add_all('RPUSH', KEYS[1])
if running then
  add_all('SADD', KEYS[2])
  add_all('SADD', KEYS[4])
else
  add_all('RPUSH', KEYS[2])
end
return #created
"""

# Finish tasks held by this worker. First writer wins: a task that is no longer running, or is held
# by another worker, is left alone and its result discarded.
# Appends the finished row to KEYS[2] as JSON, ready to read: [id, xs, ys, xs_extra, ys_extra,
# worker_id], JSON-tagged values inlined (tag stripped); signed pickles are null there and their
# positions follow as a 7th element, e.g. [..., [1, 3]], for the reader to fetch and verify.
# KEYS[1] running set, KEYS[2] finished list, KEYS[3] worker hash, KEYS[4] worker's held-tasks set
# ARGV[1] task key prefix, ARGV[2] worker id, then triples: id, ys (encoded), ys_extra (encoded or "")
# returns {number of finished tasks, discarded ids...}
FINISH_TASKS = _REQUIRE_RUNNING + """
local refused = require_running(KEYS[3])
if refused then return refused end
local discarded = {}
local function inline(value, position, pickled)
  if not value or value == '' then return 'null' end
  if string.byte(value, 1) == 106 then return string.sub(value, 2) end
  pickled[#pickled + 1] = position
  return 'null'
end
for i = 3, #ARGV, 3 do
  local id = ARGV[i]
  local key = ARGV[1] .. id
  if redis.call('SREM', KEYS[4], id) == 1 then
    redis.call('SREM', KEYS[1], id)
    redis.call('HSET', key, 'ys', ARGV[i + 1], 'state', 'finished')
    if ARGV[i + 2] ~= '' then redis.call('HSET', key, 'ys_extra', ARGV[i + 2]) end
    local task = redis.call('HMGET', key, 'xs', 'xs_extra')
    local pickled = {}
    local row = {cjson.encode(id), inline(task[1], 1, pickled), inline(ARGV[i + 1], 2, pickled),
                 inline(task[2], 3, pickled), inline(ARGV[i + 2], 4, pickled), cjson.encode(ARGV[2])}
    if #pickled > 0 then row[7] = '[' .. table.concat(pickled, ',') .. ']' end
    redis.call('RPUSH', KEYS[2], '[' .. table.concat(row, ',') .. ']')
  else
    local task = redis.call('HMGET', key, 'state', 'worker_id')
    if not (task[1] == 'finished' and task[2] == ARGV[2]) then  -- else: a re-sent call, already done
      discarded[#discarded + 1] = id
    end
  end
end
table.insert(discarded, 1, redis.call('LLEN', KEYS[2]))
return discarded
"""

# Fail tasks held by this worker (or still queued). First writer wins as for FINISH_TASKS.
# KEYS[1] running set, KEYS[2] failed list, KEYS[3] queued list, KEYS[4] worker hash,
# KEYS[5] worker's held-tasks set
# ARGV[1] task key prefix, ARGV[2] worker id, then pairs: id, condition (encoded)
# returns the ids that were neither held by this worker nor queued
FAIL_TASKS = _REQUIRE_RUNNING + """
local refused = require_running(KEYS[4])
if refused then return refused end
local discarded = {}
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  local key = ARGV[1] .. id
  local removed = redis.call('SREM', KEYS[5], id)
  if removed == 1 then
    redis.call('SREM', KEYS[1], id)
  else
    removed = redis.call('LREM', KEYS[3], 1, id)
  end
  if removed == 1 then
    redis.call('HSET', key, 'condition', ARGV[i + 1], 'state', 'failed', 'worker_id', ARGV[2])
    redis.call('RPUSH', KEYS[2], id)
  else
    local task = redis.call('HMGET', key, 'state', 'worker_id')
    if not (task[1] == 'failed' and task[2] == ARGV[2]) then  -- else: a re-sent call, already done
      discarded[#discarded + 1] = id
    end
  end
end
return discarded
"""

# Pop one task for a worker: its priority list first, then the shared queue; mark it running and
# held by the worker. ARGV[3] identifies the call: a re-sent pop (its reply was lost) returns the
# task the first one popped instead of popping another.
# KEYS[1] this worker's priority list, KEYS[2] shared queue, KEYS[3] running set, KEYS[4] worker hash,
# KEYS[5] worker's held-tasks set, KEYS[6] worker's last-pop record
# ARGV[1] task key prefix, ARGV[2] worker id, ARGV[3] request id
# returns {id, xs} or nil when both queues are empty
POP_TASK = _REQUIRE_RUNNING + """
local refused = require_running(KEYS[4])
if refused then return refused end
local last = redis.call('GET', KEYS[6])
if last then
  local request, last_id = string.match(last, '^(%S+) (.+)$')
  if request == ARGV[3] then
    if redis.call('SISMEMBER', KEYS[5], last_id) == 1 then
      return {last_id, redis.call('HGET', ARGV[1] .. last_id, 'xs')}
    end
    return false
  end
end
local id = redis.call('LPOP', KEYS[1])
if not id then id = redis.call('LPOP', KEYS[2]) end
if not id then return false end
local key = ARGV[1] .. id
redis.call('SADD', KEYS[3], id)
redis.call('SADD', KEYS[5], id)
redis.call('HSET', key, 'state', 'running', 'worker_id', ARGV[2])
redis.call('SET', KEYS[6], ARGV[3] .. ' ' .. id)
return {id, redis.call('HGET', key, 'xs')}
"""

# Move a worker to a new state if its current state allows it (terminal states are final).
# KEYS[1] worker hash, KEYS[2] workers set (all ids)
# ARGV[1] new state, ARGV[2] worker-state set prefix, ARGV[3] worker id,
# ARGV[4] comma-separated allowed current states ('*' = any, '' matches a worker without a state),
# then field/value pairs to store
# returns the previous state ('' if none), or false when the transition is not allowed
_SET_STATE = """
local function set_state(worker_key, workers, new_state, set_prefix, worker_id, allowed, first_field)
  local current = redis.call('HGET', worker_key, 'state') or ''
  if allowed ~= '*' then
    local ok = false
    for state in string.gmatch(allowed .. ',', '([^,]*),') do
      if state == current then ok = true end
    end
    if not ok then return false end
  end
  if current ~= '' then redis.call('SREM', set_prefix .. current, worker_id) end
  redis.call('SADD', set_prefix .. new_state, worker_id)
  redis.call('SADD', workers, worker_id)
  redis.call('HSET', worker_key, 'state', new_state)
  for i = first_field, #ARGV, 2 do redis.call('HSET', worker_key, ARGV[i], ARGV[i + 1]) end
  return current
end
"""
SET_WORKER_STATE = _SET_STATE + """
return set_state(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 5)
"""

# A worker ends (terminated, failed, lost, killed): in ONE step move it to its final state and release
# what it holds: its running tasks are requeued (retries left) or failed with ARGV[6], its priority
# list goes to the shared queue. Nobody can observe an ended worker that still holds tasks.
# KEYS[1] worker hash, KEYS[2] workers set, KEYS[3] running set, KEYS[4] queued list, KEYS[5] failed
# list, KEYS[6] worker's priority list, KEYS[7] set of workers with priority lists, KEYS[8] worker's
# held-tasks set, KEYS[9] worker's last-pop record
# ARGV[1] new state, ARGV[2] worker-state set prefix, ARGV[3] worker id, ARGV[4] allowed current
# states (as SET_WORKER_STATE), ARGV[5] task key prefix, ARGV[6] condition (encoded), then field/value pairs
# returns false when the transition is not allowed, else {previous state, {failed ids}, {requeued ids}}
END_WORKER = _SET_STATE + _RELEASE_TASK + """
local previous = set_state(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 7)
if previous == false then return false end
local failed, requeued = {}, {}
for _, id in ipairs(redis.call('LRANGE', KEYS[6], 0, -1)) do redis.call('RPUSH', KEYS[4], id) end
redis.call('DEL', KEYS[6], KEYS[9])
redis.call('SREM', KEYS[7], ARGV[3])
for _, id in ipairs(redis.call('SMEMBERS', KEYS[8])) do
  redis.call('SREM', KEYS[3], id)
  release_task(ARGV[5] .. id, id, KEYS[4], KEYS[5], ARGV[6], requeued, failed)
end
redis.call('DEL', KEYS[8])
return {previous, failed, requeued}
"""

# Release running tasks whose holder is not running (lost, killed, failed, terminated, or no record
# at all): the safety net behind END_WORKER. Bounded work per call: SSCAN with a cursor.
# KEYS[1] running set, KEYS[2] queued list, KEYS[3] failed list
# ARGV[1] task key prefix, ARGV[2] worker key prefix, ARGV[3] cursor, ARGV[4] count
# returns {next cursor, {failed ids}, {requeued ids}}
SWEEP_ORPHANED_TASKS = _RELEASE_TASK + """
local scan = redis.call('SSCAN', KEYS[1], ARGV[3], 'COUNT', tonumber(ARGV[4]))
local failed, requeued = {}, {}
for _, id in ipairs(scan[2]) do
  local key = ARGV[1] .. id
  local owner = redis.call('HGET', key, 'worker_id')
  local state = owner and redis.call('HGET', ARGV[2] .. owner, 'state')
  if state ~= 'running' then
    redis.call('SREM', KEYS[1], id)
    if owner then redis.call('SREM', ARGV[2] .. owner .. ':tasks', id) end
    local message = 'task held by worker ' .. tostring(owner or '?') .. ', which is ' ..
                    tostring(state or 'gone') .. ' (released by the lost-task sweep)'
    release_task(key, id, KEYS[2], KEYS[3], 'j' .. cjson.encode({message = message}), requeued, failed)
  end
end
return {scan[1], failed, requeued}
"""

# One heartbeat: refresh the key only while the worker is running, so that a worker the controller
# gave up on (or of a reset network) creates no key; returns its state either way.
# KEYS[1] worker hash, KEYS[2] heartbeat key
# ARGV[1] time stamp, ARGV[2] expiry in milliseconds
# returns the worker's state, or false when it has no record
HEARTBEAT = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'running' then redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2]) end
return state
"""

# Read task rows, a bounded chunk per call so that Redis is never blocked for long: a range of a
# list (by index) or one SSCAN step over a set. The state filter runs here, so rows of other states
# never travel. Each row is one JSON string; the client joins them into one document to parse (fast),
# and parses them one by one only when that fails (a malformed value written by someone else).
# KEYS[1] list or set of ids
# ARGV[1] 'list' or 'set', ARGV[2] start index (list) or cursor (set), ARGV[3] chunk size,
# ARGV[4] task key prefix, ARGV[5] comma-separated states to keep ('' keeps all)
# returns {rows, refs, next}: rows are '[id, xs, ys, xs_extra, ys_extra, condition, worker_id, state]'
# with JSON-tagged values inlined (tag stripped) and null for missing ones; signed pickles are not
# inlined (null) and listed in refs as flat pairs (0-based row, 1-based value index) for the client
# to read and verify itself; next is the next start index / cursor, '0' when done.
FETCH_ROWS = """
local ids, next_position
local count = tonumber(ARGV[3])
if ARGV[1] == 'list' then
  local start = tonumber(ARGV[2])
  ids = redis.call('LRANGE', KEYS[1], start, start + count - 1)
  next_position = (#ids < count) and '0' or tostring(start + count)
else
  local scan = redis.call('SSCAN', KEYS[1], ARGV[2], 'COUNT', count)
  next_position, ids = scan[1], scan[2]
end
local keep = nil
if ARGV[5] ~= '' then
  keep = {}
  for state in string.gmatch(ARGV[5], '([^,]+)') do keep[state] = true end
end
local rows, refs = {}, {}
for _, id in ipairs(ids) do
  local v = redis.call('HMGET', ARGV[4] .. id, 'xs', 'ys', 'xs_extra', 'ys_extra', 'condition',
                       'worker_id', 'state')
  if keep == nil or (v[7] and keep[v[7]]) then
    local row = {cjson.encode(id)}
    for j = 1, 5 do
      local value = v[j]
      if not value or value == '' then
        row[j + 1] = 'null'
      elseif string.byte(value, 1) == 106 then
        row[j + 1] = string.sub(value, 2)
      else
        row[j + 1] = 'null'
        refs[#refs + 1] = #rows
        refs[#refs + 1] = j
      end
    end
    row[7] = v[6] and cjson.encode(v[6]) or 'null'
    row[8] = v[7] and cjson.encode(v[7]) or 'null'
    rows[#rows + 1] = '[' .. table.concat(row, ',') .. ']'
  end
end
return {rows, refs, next_position}
"""
