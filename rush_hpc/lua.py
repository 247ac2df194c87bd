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

# Wake up to `n` workers blocked in pop_task (BLPOP on a wake-up list). At most 256 tokens are
# kept, so a list nobody waits on stays small; a worker woken for nothing just pops nothing.
_WAKE = """
local function wake(list, n)
  if n < 1 then return end
  if n > 256 then n = 256 end
  local tokens = {}
  for i = 1, n do tokens[i] = '1' end
  redis.call('RPUSH', list, unpack(tokens))
  redis.call('LTRIM', list, -256, -1)
end
"""

# Requeue a running task (retries left, at the front of the queue, waking a worker) or fail it with
# `condition`. The caller already removed it from the running set and from its holder's set.
_RELEASE_TASK = _WAKE + """
local function release_task(key, id, queued, failed, condition, requeued_ids, failed_ids, wake_list)
  if redis.call('TYPE', key).ok ~= 'hash' then return end  -- not a task (written by someone else): drop it
  -- counters are read defensively (a Redis writer may have put anything there) and written with
  -- HSET: a script must not fail halfway, since Lua does not roll back what it already wrote
  local max_retries = tonumber(redis.call('HGET', key, 'max_retries') or '0') or 0
  local n_retries = tonumber(redis.call('HGET', key, 'n_retries') or '0') or 0
  if not (max_retries >= 0 and max_retries <= 1e6) then max_retries = 0 end
  if not (n_retries >= 0 and n_retries <= 1e6) then n_retries = max_retries end
  if n_retries < max_retries then
    redis.call('HSET', key, 'n_retries', math.floor(n_retries) + 1, 'state', 'queued')
    redis.call('LPUSH', queued, id)
    wake(wake_list, 1)
    requeued_ids[#requeued_ids + 1] = id
  else
    redis.call('HSET', key, 'state', 'failed', 'condition', condition)
    redis.call('RPUSH', failed, id)
    failed_ids[#failed_ids + 1] = id
  end
end
"""

# Create tasks, queued or running (held by the creating worker). Ids already present are skipped,
# so a re-sent call creates nothing twice. Queued tasks for one worker (ARGV[5]) go to its priority
# list while it is running, else to the shared queue: checked here, so none lands in the list of a
# worker that has ended (which nobody would ever pop).
# KEYS[1] all-tasks list, KEYS[2] running set, KEYS[3] the creating worker's hash, KEYS[4] its
# held-tasks set (both unused when ARGV[3] == ''), KEYS[5] shared queue, KEYS[6] its wake-up list,
# KEYS[7] the priority worker's hash, KEYS[8] its priority list, KEYS[9] its wake-up list,
# KEYS[10] set of workers with priority lists (KEYS[7..9] unused when ARGV[5] == '')
# ARGV[1] task key prefix, ARGV[2] 'running' or 'queued', ARGV[3] creating worker id ('' = controller),
# ARGV[4] max_retries ('' for none), ARGV[5] priority worker id or '', then triples: id, xs (encoded),
# xs_extra (encoded or '')
# returns the number of tasks created
CREATE_TASKS = _REQUIRE_RUNNING + _WAKE + """
if ARGV[3] ~= '' then
  local refused = require_running(KEYS[3])
  if refused then return refused end
end
local running = ARGV[2] == 'running'
local created = {}
for i = 6, #ARGV, 3 do
  local id = ARGV[i]
  local key = ARGV[1] .. id
  -- 0: a re-sent call, it exists already ('state' is the one field every task keeps, finished too)
  if redis.call('HSETNX', key, 'state', ARGV[2]) == 1 then
    local fields = {'xs', ARGV[i + 1]}
    if ARGV[i + 2] ~= '' then fields[#fields + 1] = 'xs_extra'; fields[#fields + 1] = ARGV[i + 2] end
    if ARGV[4] ~= '' then fields[#fields + 1] = 'max_retries'; fields[#fields + 1] = ARGV[4] end
    if running then fields[#fields + 1] = 'worker_id'; fields[#fields + 1] = ARGV[3] end
    redis.call('HSET', key, unpack(fields))
    created[#created + 1] = id
  end
end
local function add_all(command, key)  -- in slices: unpack() has a limit on its results
  for first = 1, #created, 4000 do
    redis.call(command, key, unpack(created, first, math.min(first + 3999, #created)))
  end
end
if #created == 0 then return 0 end
add_all('RPUSH', KEYS[1])
if running then
  add_all('SADD', KEYS[2])
  add_all('SADD', KEYS[4])
elseif ARGV[5] ~= '' and redis.call('HGET', KEYS[7], 'state') == 'running' then
  add_all('RPUSH', KEYS[8])
  redis.call('SADD', KEYS[10], ARGV[5])
  wake(KEYS[9], #created)
else
  add_all('RPUSH', KEYS[5])
  wake(KEYS[6], #created)
end
return #created
"""

# The hot path's creation: running tasks held by the creating worker (push_running_tasks). The same
# as CREATE_TASKS for state 'running', with only the keys it needs (fewer arguments to pack and send).
# KEYS[1] all-tasks list, KEYS[2] running set, KEYS[3] the worker's hash, KEYS[4] its held-tasks set
# ARGV[1] task key prefix, ARGV[2] worker id, then pairs: id, xs (encoded), and ARGV[3] xs_extra
# (encoded or '', the same for all: the worker's pid)
# returns the number of tasks created
CREATE_RUNNING_TASKS = _REQUIRE_RUNNING + """
local refused = require_running(KEYS[3])
if refused then return refused end
local created = {}
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  local key = ARGV[1] .. id
  -- HSET counts the fields it adds: 0 when the task exists (a re-sent call), which then writes the
  -- values it already holds: the ids are known to this worker only, which is running (checked
  -- above) and so still holds these tasks as they were created
  local added
  if ARGV[3] ~= '' then
    added = redis.call('HSET', key, 'state', 'running', 'xs', ARGV[i + 1], 'worker_id', ARGV[2], 'xs_extra', ARGV[3])
  else
    added = redis.call('HSET', key, 'state', 'running', 'xs', ARGV[i + 1], 'worker_id', ARGV[2])
  end
  if added > 0 then created[#created + 1] = id end
end
for first = 1, #created, 4000 do  -- in slices: unpack() has a limit on its results
  local slice = {unpack(created, first, math.min(first + 3999, #created))}
  redis.call('RPUSH', KEYS[1], unpack(slice))
  redis.call('SADD', KEYS[2], unpack(slice))
  redis.call('SADD', KEYS[4], unpack(slice))
end
return #created
"""

# A finished task's row: its hash keeps `row`, the index of the row in the finished list. The hash
# and the list are Redis contents (untrusted): the index must be a plain integer and the row must
# begin with the task's own id, else there is no row (nil).
_FINISHED_ROW = """
local function row_index(value)
  if value and string.match(value, '^%d+$') and #value <= 15 then return value end
  return nil
end
local function finished_row(id, index, finished)
  index = row_index(index)
  if not index then return nil end
  local row = redis.call('LINDEX', finished, index)
  local head = '[' .. cjson.encode(id) .. ','
  if row and string.sub(row, 1, #head) == head then return row end
  return nil
end
-- true when the task is finished and its row names this worker (worker_json: its id as JSON)
local function finished_by(key, id, finished, worker_json)
  local task = redis.call('HMGET', key, 'state', 'row', 'worker_id')
  if task[1] ~= 'finished' then return false end
  if not task[2] then return task[3] ~= false and cjson.encode(task[3]) == worker_json end  -- the old layout
  local row = finished_row(id, task[2], finished)
  if row == nil then return false end
  row = string.gsub(row, ',%[[%d,]*%]%]$', ']')  -- the positions of signed pickles, if any
  local tail = ',null,' .. worker_json .. ',"finished"]'
  return string.sub(row, -#tail) == tail
end
"""

# Finish tasks held by this worker. First writer wins: a task that is no longer running, or is held
# by another worker, is left alone and its result discarded.
# Appends the finished row to the finished list as JSON, ready to read, in the one row format that
# FETCH_ROWS returns too: [id, xs, ys, xs_extra, ys_extra, condition, worker_id, state] with
# JSON-tagged values inlined (tag stripped); signed pickles are null there and their positions follow
# as a 9th element, e.g. [..., [2, 4]], for the reader to fetch and verify.
# Each value is then stored once: the task hash is rewritten to {state = 'finished', row = <index of
# its row in the finished list>} plus only the signed pickles the row does not hold. A re-sent finish
# recognises its own repeat from that row (its id and worker).
# Arguments from ARGV[first] on: triples id, ys (encoded), ys_extra (encoded or '').
# Returns the discarded ids and the length of the finished list after its last append (false when
# this call appended nothing: a repeat, or only discarded results).
_FINISH = """
local function inline(value, position, pickled)
  if not value or value == '' then return 'null' end
  if string.byte(value, 1) == 106 then return string.sub(value, 2) end
  pickled[#pickled + 1] = position
  return 'null'
end
local PICKLE_FIELDS = {'xs', 'ys', 'xs_extra', 'ys_extra'}
local function finish(running, finished, held, prefix, worker_id, first, request)
  local discarded, length = {}, false
  local worker_json = cjson.encode(worker_id)
  for i = first, #ARGV, 3 do
    local id = ARGV[i]
    local key = prefix .. id
    local task = nil
    if redis.call('SREM', held, id) == 1 then
      task = redis.call('HMGET', key, 'xs', 'xs_extra', 'pop_request')
      if request and task[3] == request then
        -- popped by an earlier run of this very call (a re-send): still held, not finished now,
        -- returned again by pop()
        redis.call('SADD', held, id)
        discarded[#discarded + 1] = id
        task = false
      end
    end
    if task then
      redis.call('SREM', running, id)
      local values = {task[1], ARGV[i + 1], task[2], ARGV[i + 2]}
      local pickled = {}
      local row = {cjson.encode(id), inline(values[1], 1, pickled), inline(values[2], 2, pickled),
                   inline(values[3], 3, pickled), inline(values[4], 4, pickled), 'null', worker_json,
                   '"finished"'}
      if #pickled > 0 then row[9] = '[' .. table.concat(pickled, ',') .. ']' end
      length = redis.call('RPUSH', finished, '[' .. table.concat(row, ',') .. ']')
      redis.call('DEL', key)
      if #pickled == 0 then
        redis.call('HSET', key, 'state', 'finished', 'row', length - 1)
      else
        local fields = {'state', 'finished', 'row', length - 1}
        for _, position in ipairs(pickled) do
          fields[#fields + 1] = PICKLE_FIELDS[position]
          fields[#fields + 1] = values[position]
        end
        redis.call('HSET', key, unpack(fields))
      end
    elseif task == nil and not finished_by(key, id, finished, worker_json) then
      discarded[#discarded + 1] = id  -- (finished by this worker: a re-sent call, already done)
    end
  end
  return discarded, length
end
"""

# KEYS[1] running set, KEYS[2] finished list, KEYS[3] worker hash, KEYS[4] worker's held-tasks set
# ARGV[1] task key prefix, ARGV[2] worker id, then triples: id, ys (encoded), ys_extra (encoded or "")
# returns {number of finished tasks, discarded ids...}
FINISH_TASKS = _REQUIRE_RUNNING + _FINISHED_ROW + _FINISH + """
local refused = require_running(KEYS[3])
if refused then return refused end
local discarded, length = finish(KEYS[1], KEYS[2], KEYS[4], ARGV[1], ARGV[2], 3)
table.insert(discarded, 1, length or redis.call('LLEN', KEYS[2]))
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
# held by the worker. `request` identifies the call and is kept in the task: a re-sent pop (its reply
# was lost) finds the task it popped among the few the worker holds, instead of popping another.
# `scan` false skips that search, for a caller that knows no earlier call carried this request.
_POP = """
local function pop(priority, queued, running, held, prefix, worker_id, request, scan)
  if scan then
    for _, held_id in ipairs(redis.call('SMEMBERS', held)) do
      if redis.call('HGET', prefix .. held_id, 'pop_request') == request then
        return {held_id, redis.call('HGET', prefix .. held_id, 'xs')}
      end
    end
  end
  local id = redis.call('LPOP', priority)
  if not id then id = redis.call('LPOP', queued) end
  if not id then return false end
  local key = prefix .. id
  redis.call('SADD', running, id)
  redis.call('SADD', held, id)
  redis.call('HSET', key, 'state', 'running', 'worker_id', worker_id, 'pop_request', request)
  return {id, redis.call('HGET', key, 'xs')}
end
"""

# KEYS[1] this worker's priority list, KEYS[2] shared queue, KEYS[3] running set, KEYS[4] worker hash,
# KEYS[5] worker's held-tasks set
# ARGV[1] task key prefix, ARGV[2] worker id, ARGV[3] request id
# returns {id, xs} or nil when both queues are empty
POP_TASK = _REQUIRE_RUNNING + _POP + """
local refused = require_running(KEYS[4])
if refused then return refused end
return pop(KEYS[1], KEYS[2], KEYS[3], KEYS[5], ARGV[1], ARGV[2], ARGV[3], true)
"""

# Finish tasks and pop the next one in ONE round trip (a queue worker's whole step).
# The search for a task popped earlier by the same request is skipped when the client says the
# request id is new (ARGV[4] == '1') and this execution finished a task: then it is not a re-sent
# call (a re-send finds its tasks finished already), so no earlier call popped with this request.
# KEYS[1] running set, KEYS[2] finished list, KEYS[3] worker hash, KEYS[4] worker's held-tasks set,
# KEYS[5] this worker's priority list, KEYS[6] shared queue
# ARGV[1] task key prefix, ARGV[2] worker id, ARGV[3] pop request id, ARGV[4] '1' when no earlier
# call carried that request id, then triples as FINISH_TASKS
# returns {number of finished tasks, {discarded ids}, {id, xs} or false}
FINISH_AND_POP = _REQUIRE_RUNNING + _FINISHED_ROW + _FINISH + _POP + """
local refused = require_running(KEYS[3])
if refused then return refused end
local discarded, length = finish(KEYS[1], KEYS[2], KEYS[4], ARGV[1], ARGV[2], 5, ARGV[3])
local scan = not (ARGV[4] == '1' and length)
local popped = pop(KEYS[5], KEYS[6], KEYS[1], KEYS[4], ARGV[1], ARGV[2], ARGV[3], scan)
return {length or redis.call('LLEN', KEYS[2]), discarded, popped}
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
# held-tasks set, KEYS[9] the shared queue's wake-up list
# ARGV[1] new state, ARGV[2] worker-state set prefix, ARGV[3] worker id, ARGV[4] allowed current
# states (as SET_WORKER_STATE), ARGV[5] task key prefix, ARGV[6] condition (encoded), then field/value pairs
# returns false when the transition is not allowed, else {previous state, {failed ids}, {requeued ids}}
END_WORKER = _SET_STATE + _RELEASE_TASK + """
local previous = set_state(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 7)
if previous == false then return false end
local failed, requeued = {}, {}
local waiting = redis.call('LRANGE', KEYS[6], 0, -1)
for _, id in ipairs(waiting) do redis.call('RPUSH', KEYS[4], id) end
wake(KEYS[9], #waiting)
redis.call('DEL', KEYS[6])
redis.call('SREM', KEYS[7], ARGV[3])
for _, id in ipairs(redis.call('SMEMBERS', KEYS[8])) do
  redis.call('SREM', KEYS[3], id)
  release_task(ARGV[5] .. id, id, KEYS[4], KEYS[5], ARGV[6], requeued, failed, KEYS[9])
end
redis.call('DEL', KEYS[8])
return {previous, failed, requeued}
"""

# Release running tasks whose holder is not running (lost, killed, failed, terminated, or no record
# at all): the safety net behind END_WORKER. Bounded work per call: SSCAN with a cursor.
# Also (on the first call, cursor 0) moves the priority lists of workers that are not running to the
# shared queue. KEYS[1] running set, KEYS[2] queued list, KEYS[3] failed list, KEYS[4] the queue's
# wake-up list, KEYS[5] set of workers with priority lists
# ARGV[1] task key prefix, ARGV[2] worker key prefix, ARGV[3] cursor, ARGV[4] count,
# ARGV[5] priority list prefix
# returns {next cursor, {failed ids}, {requeued ids}}
SWEEP_ORPHANED_TASKS = _RELEASE_TASK + """
local scan = redis.call('SSCAN', KEYS[1], ARGV[3], 'COUNT', tonumber(ARGV[4]))
local failed, requeued = {}, {}
for _, id in ipairs(scan[2]) do
  local key = ARGV[1] .. id
  local owner = false
  if redis.call('TYPE', key).ok == 'hash' then owner = redis.call('HGET', key, 'worker_id') end
  local state = false
  if owner and redis.call('TYPE', ARGV[2] .. owner).ok == 'hash' then
    state = redis.call('HGET', ARGV[2] .. owner, 'state')
  end
  if state ~= 'running' then
    redis.call('SREM', KEYS[1], id)
    if owner then redis.call('SREM', ARGV[2] .. owner .. ':tasks', id) end
    local message = 'task held by worker ' .. tostring(owner or '?') .. ', which is ' ..
                    tostring(state or 'gone') .. ' (released by the lost-task sweep)'
    release_task(key, id, KEYS[2], KEYS[3], 'j' .. cjson.encode({message = message}), requeued, failed,
                 KEYS[4])
  end
end
if ARGV[3] == '0' then  -- once per sweep: priority lists of workers that are not running
  for _, owner in ipairs(redis.call('SMEMBERS', KEYS[5])) do
    local owner_key = ARGV[2] .. owner
    if redis.call('TYPE', owner_key).ok ~= 'hash' or redis.call('HGET', owner_key, 'state') ~= 'running' then
      local list = ARGV[5] .. owner
      local waiting = {}
      if redis.call('TYPE', list).ok == 'list' then waiting = redis.call('LRANGE', list, 0, -1) end
      for _, id in ipairs(waiting) do
        redis.call('RPUSH', KEYS[2], id)
        requeued[#requeued + 1] = id
      end
      wake(KEYS[4], #waiting)
      redis.call('DEL', list)
      redis.call('SREM', KEYS[5], owner)
    end
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

# Read task rows, a bounded chunk per call so that Redis is never blocked for long: a range of an
# append-only list (by index), or the ids the client gives (a snapshot it read of a queue that
# workers pop from meanwhile, or of the running set). The state filter runs here, so rows of other
# states never travel. Each row is one JSON string, which the client decodes on its own (rows.py: a
# malformed value written by someone else spoils its own row only).
# A finished task's row is its row of the finished list (the task hash keeps only its index): this
# script returns the marker '#<index>#<id>' for it, and the client reads the rows of all markers of a
# fetch in a few range reads of the finished list. Reading them here, one seek per task, held Redis
# for a time that grew with the list (~0.5 ms per seek at 1M rows) when tasks finished out of order.
# KEYS[1] the list the ids come from, KEYS[2] the finished list (unused: kept for Redis Cluster routing)
# ARGV[1] 'list', 'ids', or 'ids-from-hash' (ids; rows built from the hashes, no markers: for
# markers whose row did not check out), ARGV[2] start index ('list'), ARGV[3] chunk size, ARGV[4] task
# key prefix, ARGV[5] comma-separated states to keep ('' keeps all), ARGV[6...] the ids ('ids...')
# returns {rows, refs, next}: rows are '[id, xs, ys, xs_extra, ys_extra, condition, worker_id, state]'
# with JSON-tagged values inlined (tag stripped) and null for missing ones, or markers; signed pickles
# are not inlined (null) and listed in refs as flat pairs (0-based row, 1-based value index) for the
# client to read and verify itself (a finished row lists them as its own 9th element instead); next
# is the next start index, '0' when done.
FETCH_ROWS = _FINISHED_ROW + """
local ids, next_position
local count = tonumber(ARGV[3])
if ARGV[1] == 'list' then
  local start = tonumber(ARGV[2])
  ids = redis.call('LRANGE', KEYS[1], start, start + count - 1)
  next_position = (#ids < count) and '0' or tostring(start + count)
else
  ids = {unpack(ARGV, 6)}
  next_position = '0'
end
local from_rows = ARGV[1] ~= 'ids-from-hash'  -- 'ids-from-hash': rows built from the hashes only
local keep = nil
if ARGV[5] ~= '' then
  keep = {}
  for state in string.gmatch(ARGV[5], '([^,]+)') do keep[state] = true end
end
local rows, refs = {}, {}
local function build(id, v, position)  -- a row from the task hash; position: 0-based
  local row = {cjson.encode(id)}
  for j = 1, 5 do
    local value = v[j]
    if not value or value == '' then
      row[j + 1] = 'null'
    elseif string.byte(value, 1) == 106 then
      row[j + 1] = string.sub(value, 2)
    else
      row[j + 1] = 'null'
      refs[#refs + 1] = position
      refs[#refs + 1] = j
    end
  end
  row[7] = v[6] and cjson.encode(v[6]) or 'null'
  row[8] = v[7] and cjson.encode(v[7]) or 'null'
  return '[' .. table.concat(row, ',') .. ']'
end
for _, id in ipairs(ids) do
  local v = redis.call('HMGET', ARGV[4] .. id, 'xs', 'ys', 'xs_extra', 'ys_extra', 'condition',
                       'worker_id', 'state', 'row')
  if keep == nil or (v[7] and keep[v[7]]) then
    local index = from_rows and v[7] == 'finished' and row_index(v[8])
    if index then  -- the client reads it from the finished list, all markers of a fetch at once
      rows[#rows + 1] = '#' .. index .. '#' .. id
    else
      rows[#rows + 1] = build(id, v, #rows)
    end
  end
end
return {rows, refs, next_position}
"""
