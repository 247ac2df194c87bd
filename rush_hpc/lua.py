"""Lua scripts for the state changes that must be atomic (one round trip each).

Each header documents KEYS and ARGV. Task ids travel in ARGV and the scripts derive the task hash
key as ``task_prefix .. id``; every such key shares the network's hash tag, so this is safe in a
Redis Cluster slot.
"""

# Finish running tasks. First writer wins: a task that is no longer running is left alone.
# Appends the finished row to KEYS[2] as JSON, ready to read: [id, xs, ys, xs_extra, ys_extra,
# worker_id], JSON-tagged values inlined (tag stripped); signed pickles are null there and their
# positions follow as a 7th element, e.g. [..., [1, 3]], for the reader to fetch and verify.
# KEYS[1] running set, KEYS[2] finished list
# ARGV[1] task key prefix, then triples: id, ys (encoded), ys_extra (encoded or "")
# returns the ids that were NOT running (their results were discarded)
FINISH_TASKS = """
local discarded = {}
local function inline(value, position, pickled)
  if not value or value == '' then return 'null' end
  if string.byte(value, 1) == 106 then return string.sub(value, 2) end
  pickled[#pickled + 1] = position
  return 'null'
end
for i = 2, #ARGV, 3 do
  local id = ARGV[i]
  if redis.call('SREM', KEYS[1], id) == 1 then
    local key = ARGV[1] .. id
    redis.call('HSET', key, 'ys', ARGV[i + 1], 'state', 'finished')
    if ARGV[i + 2] ~= '' then redis.call('HSET', key, 'ys_extra', ARGV[i + 2]) end
    local task = redis.call('HMGET', key, 'xs', 'xs_extra', 'worker_id')
    local pickled = {}
    local row = {cjson.encode(id), inline(task[1], 1, pickled), inline(ARGV[i + 1], 2, pickled),
                 inline(task[2], 3, pickled), inline(ARGV[i + 2], 4, pickled),
                 task[3] and cjson.encode(task[3]) or 'null'}
    if #pickled > 0 then row[7] = '[' .. table.concat(pickled, ',') .. ']' end
    redis.call('RPUSH', KEYS[2], '[' .. table.concat(row, ',') .. ']')
  else
    discarded[#discarded + 1] = id
  end
end
return discarded
"""

# Fail running (or queued) tasks. First writer wins as for FINISH_TASKS.
# KEYS[1] running set, KEYS[2] failed list, KEYS[3] queued list
# ARGV[1] task key prefix, then pairs: id, condition (encoded)
# returns the ids that were neither running nor queued
FAIL_TASKS = """
local discarded = {}
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  local removed = redis.call('SREM', KEYS[1], id)
  if removed == 0 then removed = redis.call('LREM', KEYS[3], 1, id) end
  if removed == 1 then
    redis.call('HSET', ARGV[1] .. id, 'condition', ARGV[i + 1], 'state', 'failed')
    redis.call('RPUSH', KEYS[2], id)
  else
    discarded[#discarded + 1] = id
  end
end
return discarded
"""

# Pop one task for a worker: its priority list first, then the shared queue; mark it running.
# KEYS[1] this worker's priority list, KEYS[2] shared queue, KEYS[3] running set
# ARGV[1] task key prefix, ARGV[2] worker id
# returns {id, xs} or nil when both queues are empty
POP_TASK = """
local id = redis.call('LPOP', KEYS[1])
if not id then id = redis.call('LPOP', KEYS[2]) end
if not id then return false end
local key = ARGV[1] .. id
redis.call('SADD', KEYS[3], id)
redis.call('HSET', key, 'state', 'running', 'worker_id', ARGV[2])
return {id, redis.call('HGET', key, 'xs')}
"""

# Release the tasks of a worker that is gone (ended, lost, killed): requeue running tasks with
# retries left (at the front of the queue), fail the others with the given condition, and move
# the tasks still waiting in its priority list to the shared queue.
# KEYS[1] running set, KEYS[2] queued list, KEYS[3] failed list, KEYS[4] the worker's priority
# list, KEYS[5] set of workers with priority lists
# ARGV[1] task key prefix, ARGV[2] worker id, ARGV[3] condition (encoded)
# returns {failed ids..., '|', requeued ids...}
RELEASE_WORKER_TASKS = """
local failed, requeued = {}, {}
for _, id in ipairs(redis.call('LRANGE', KEYS[4], 0, -1)) do redis.call('RPUSH', KEYS[2], id) end
redis.call('DEL', KEYS[4])
redis.call('SREM', KEYS[5], ARGV[2])
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. id
  if redis.call('HGET', key, 'worker_id') == ARGV[2] then
    redis.call('SREM', KEYS[1], id)
    local max_retries = tonumber(redis.call('HGET', key, 'max_retries') or '0') or 0
    local n_retries = tonumber(redis.call('HGET', key, 'n_retries') or '0') or 0
    if n_retries < max_retries then
      redis.call('HINCRBY', key, 'n_retries', 1)
      redis.call('HSET', key, 'state', 'queued')
      redis.call('LPUSH', KEYS[2], id)
      requeued[#requeued + 1] = id
    else
      redis.call('HSET', key, 'state', 'failed', 'condition', ARGV[3])
      redis.call('RPUSH', KEYS[3], id)
      failed[#failed + 1] = id
    end
  end
end
failed[#failed + 1] = '|'
for _, id in ipairs(requeued) do failed[#failed + 1] = id end
return failed
"""

# Move a worker to a new state if its current state allows it (terminal states are final).
# KEYS[1] worker hash, KEYS[2] workers set (all ids)
# ARGV[1] new state, ARGV[2] worker-state set prefix, ARGV[3] worker id,
# ARGV[4] comma-separated allowed current states ('*' = any, '' matches a worker without a state),
# then field/value pairs to store
# returns the previous state ('' if none), or false when the transition is not allowed
SET_WORKER_STATE = """
local current = redis.call('HGET', KEYS[1], 'state') or ''
if ARGV[4] ~= '*' then
  local allowed = false
  for state in string.gmatch(ARGV[4] .. ',', '([^,]*),') do
    if state == current then allowed = true end
  end
  if not allowed then return false end
end
if current ~= '' then redis.call('SREM', ARGV[2] .. current, ARGV[3]) end
redis.call('SADD', ARGV[2] .. ARGV[1], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[1], 'state', ARGV[1])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return current
"""

# Read task rows of a list range or a whole set, in one call, as ONE JSON string: parsing one
# string is far cheaper for the client than hundreds of thousands of reply items.
# KEYS[1] list or set of ids
# ARGV[1] 'list' or 'set', ARGV[2] start, ARGV[3] stop (list only), ARGV[4] task key prefix
# returns {json, refs}: json is '[[id, xs, ys, xs_extra, ys_extra, condition, worker_id, state], ...]'
# with JSON-tagged values inlined (tag stripped) and null for missing ones; signed pickles are not
# inlined (null) and listed in refs as flat pairs (0-based row, 1-based value index) for the client
# to read and verify itself.
FETCH_ROWS = """
local ids
if ARGV[1] == 'list' then
  ids = redis.call('LRANGE', KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3]))
else
  ids = redis.call('SMEMBERS', KEYS[1])
end
local parts, refs = {}, {}
for i, id in ipairs(ids) do
  local v = redis.call('HMGET', ARGV[4] .. id, 'xs', 'ys', 'xs_extra', 'ys_extra', 'condition',
                       'worker_id', 'state')
  local row = {cjson.encode(id)}
  for j = 1, 5 do
    local value = v[j]
    if not value or value == '' then
      row[j + 1] = 'null'
    elseif string.byte(value, 1) == 106 then
      row[j + 1] = string.sub(value, 2)
    else
      row[j + 1] = 'null'
      refs[#refs + 1] = i - 1
      refs[#refs + 1] = j
    end
  end
  row[7] = v[6] and cjson.encode(v[6]) or 'null'
  row[8] = v[7] and cjson.encode(v[7]) or 'null'
  parts[i] = '[' .. table.concat(row, ',') .. ']'
end
return {'[' .. table.concat(parts, ',') .. ']', refs}
"""
