-- Shared by every script: key names and the transitions that keep the counters and indexes right.
-- Put before every script by jobs.redis_lua.
local P = ARGV[1]
local GROUP = 'runners'
local TERMINAL = {succeeded = true, failed = true, cancelled = true}
local ENDED = {ok = true, error = true, cancelled = true}

local function jkey(id) return P .. 'job:' .. id end
local function ikey(id) return P .. 'items:' .. id end
local function qkey(queue) return P .. 'queue:' .. queue end

-- The queue of a job's items: its style and client (a job stored before clients: its style).
local function jqueue(id)
  local q = redis.call('HGET', jkey(id), 'queue')
  if q and q ~= '' then return q end
  return redis.call('HGET', jkey(id), 'style')
end

-- The job's usage (photos until their item ends, reserved estimates, results), its account's (the
-- client whose share it counts against; none for jobs stored before accounts) and the total.
local function account(id, delta)
  if delta ~= 0 then
    redis.call('INCRBY', P .. 'usage', delta)
    redis.call('HINCRBY', jkey(id), 'bytes', delta)
    local owner = redis.call('HGET', jkey(id), 'account')
    if owner and owner ~= '' then redis.call('INCRBY', P .. 'usage:' .. owner, delta) end
  end
end

-- A stream entry that no longer stands for work: off the pending list and out of the stream.
local function drop_entry(queue, entry)
  if type(entry) == 'string' and entry ~= '' then
    redis.call('XACK', qkey(queue), GROUP, entry)
    redis.call('XDEL', qkey(queue), entry)
  end
end

-- Moves a job to another status (indexes too); an ended one gets its expiry and, if it has a
-- webhook, a pending delivery.
local function set_status(id, old, new, now, expires)
  local created = redis.call('HGET', jkey(id), 'created_at')
  redis.call('ZREM', P .. 'status:' .. old, id)
  redis.call('ZADD', P .. 'status:' .. new, created, id)
  redis.call('HSET', jkey(id), 'status', new, 'updated_at', now)
  if TERMINAL[new] then
    redis.call('HSET', jkey(id), 'expires_at', expires)
    redis.call('ZADD', P .. 'expiry', expires, id)
    if redis.call('HGET', jkey(id), 'webhook') ~= '' then
      redis.call('HSET', jkey(id), 'webhook_state', 'pending')
      redis.call('SADD', P .. 'webhooks', id)
    end
  end
end

-- Ends an item that had not ended: its photo and its result's reservation are released, the
-- result (if any) counts at its real size, and its stream entry is dropped.
local function end_item(id, idx, item, status, err, result_bytes, queue)
  if item.status == 'queued' then redis.call('DECR', P .. 'waiting') end
  drop_entry(queue, item.entry)
  account(id, result_bytes - item.input_bytes - item.estimate)
  item.status = status
  item.error = err
  item.input_bytes = 0
  item.result_bytes = result_bytes
  item.entry = nil
  item.owner = nil
  redis.call('HSET', ikey(id), idx, cjson.encode(item))
  redis.call('HINCRBY', jkey(id), 'left', -1)
end

-- The consumer that holds a stream entry (its lease), or false.
local function holder(queue, entry)
  local p = redis.pcall('XPENDING', qkey(queue), GROUP, entry, entry, 1)
  if type(p) ~= 'table' or #p == 0 then return false end
  return p[1][2]
end
