"""The Lua scripts of :mod:`jobs.redis`: every change that must check and write atomically across replicas.

Redis runs a script as one command (nothing else interleaves), so each script is a transaction. Keys
are derived inside the scripts from the prefix (``ARGV[1]``) and the records they read, because the
stream entry a runner is handed decides which job and item it touches; all keys share one hash tag.

Each script may run twice when a client retries after a lost reply: the second run finds the change
made and does nothing (a job that exists, an entry no longer held, a job that has ended), except
``CLAIM``, whose second run claims another item; the first one's item then waits out its lease.

Layout (``P`` is ``{prefix}:``):

* ``P job:<id>`` (hash): ``status``, ``options`` (JSON), ``style``, ``client`` (who handed it in),
  ``queue`` (``<style>:<client>``), ``created_at``, ``updated_at``, ``expires_at``, ``webhook``,
  ``webhook_state``, ``idempotency_key``, ``error`` (``""`` for none), ``left`` (items not ended),
  ``bytes`` (what the job holds in the usage counter);
* ``P items:<id>`` (hash): item index → JSON (``filename``, ``status``, ``error``, ``faces_stylized``,
  ``timings_ms``, ``input_bytes``, ``result_bytes``, ``estimate``, plus ``entry``: the id of the
  item's current stream entry while it is queued or running, and ``owner``);
* ``P queue:<style>:<client>`` (stream, consumer group ``runners``): one entry per queued item
  (``job``, ``index``); an entry is pending (leased) while its item runs, acked and deleted when the
  item ends or goes back to the queue (as a new entry). One stream per style and client, so that
  clients take turns (jobs stored before there were clients are in ``P queue:<style>``);
* ``P idem:<key>`` (string): the job an idempotency key made;
* ``P usage``, ``P waiting`` (integers): bytes used or reserved by every job; items queued;
* ``P created``, ``P status:<status>``, ``P client:<client>`` (sorted sets by ``created_at``),
  ``P expiry`` (ended jobs by ``expires_at``), ``P webhooks`` (set: jobs whose webhook is pending),
  ``P styles`` (set: the queues, ``<style>:<client>``, that have a stream);
* ``P vtime`` (float), ``P finish`` (hash: client → float): whose turn it is (start-time fair queuing
  by item: a client's next item starts at the later of ``vtime`` and its ``finish``, the smallest
  start goes first).
"""

from __future__ import annotations

from typing import Final

#: Shared by every script: key names and the transitions that keep the counters and indexes right.
_PRELUDE: Final = r"""
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

-- The job's usage (photos until their item ends, reserved estimates, results) and the total.
local function account(id, delta)
  if delta ~= 0 then
    redis.call('INCRBY', P .. 'usage', delta)
    redis.call('HINCRBY', jkey(id), 'bytes', delta)
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
"""

#: ARGV: prefix, job id, options JSON, style, now, expires_at, webhook, idempotency key, quota, needed
#: bytes, items JSON (a list of item objects), client. Returns ``{'created'}``, ``{'exists', id}`` (the key is
#: known) or ``{'quota', used}``.
CREATE: Final = (
    _PRELUDE
    + r"""
local id, style, now, client = ARGV[2], ARGV[4], ARGV[5], ARGV[12]
local queue = style .. ':' .. client
-- A client that retried after a lost reply: the first call did it.
if redis.call('EXISTS', jkey(id)) == 1 then return {'created'} end
local idem = ARGV[8]
if idem ~= '' then
  local existing = redis.call('GET', P .. 'idem:' .. idem)
  if existing then return {'exists', existing} end
end
local used = tonumber(redis.call('GET', P .. 'usage') or '0')
local needed = tonumber(ARGV[10])
if used + needed > tonumber(ARGV[9]) then return {'quota', tostring(used)} end
redis.call('HSET', jkey(id), 'id', id, 'status', 'queued', 'options', ARGV[3], 'style', style,
  'client', client, 'queue', queue, 'created_at', now, 'updated_at', now, 'expires_at', ARGV[6],
  'webhook', ARGV[7], 'webhook_state', 'none', 'idempotency_key', idem, 'error', '', 'bytes', 0,
  'left', 0)
-- The group reads from the stream's start, so entries added before a replica first reads are seen.
redis.pcall('XGROUP', 'CREATE', qkey(queue), GROUP, '0', 'MKSTREAM')
redis.call('SADD', P .. 'styles', queue)
local left = 0
for i, item in ipairs(cjson.decode(ARGV[11])) do
  local idx = tostring(i - 1)
  if item.status == 'queued' then
    item.entry = redis.call('XADD', qkey(queue), '*', 'job', id, 'index', idx)
    left = left + 1
  end
  redis.call('HSET', ikey(id), idx, cjson.encode(item))
end
redis.call('HSET', jkey(id), 'left', left)
redis.call('INCRBY', P .. 'waiting', left)
account(id, needed)
redis.call('ZADD', P .. 'created', now, id)
redis.call('ZADD', P .. 'client:' .. client, now, id)
redis.call('ZADD', P .. 'status:queued', now, id)
if idem ~= '' then redis.call('SET', P .. 'idem:' .. idem, id) end
-- Every photo was refused at acceptance: the job has ended already.
if left == 0 then set_status(id, 'queued', 'succeeded', now, ARGV[6]) end
return {'created'}
"""
)

#: ARGV: prefix, consumer, lease (ms), now, then the styles this runner can serve. Returns
#: ``{claim, dropped}``: claim is ``{job id, index, filename, options, entry, queue, client}`` or
#: empty; dropped lists ``job id, index`` pairs of items ended here (their photos can go).
CLAIM: Final = (
    _PRELUDE
    + r"""
local consumer, lease, now = ARGV[2], ARGV[3], ARGV[4]
local dropped = {}

-- Marks the item of a stream entry this consumer now holds as running, or drops a stale entry.
local function take(queue, client, entry, fields)
  if type(fields) ~= 'table' then drop_entry(queue, entry); return nil end
  local f = {}
  for k = 1, #fields, 2 do f[fields[k]] = fields[k + 1] end
  local id, idx = f['job'], f['index']
  local status = id and redis.call('HGET', jkey(id), 'status')
  local raw = status and redis.call('HGET', ikey(id), idx)
  if not raw then drop_entry(queue, entry); return nil end
  local item = cjson.decode(raw)
  if item.entry ~= entry or ENDED[item.status] then drop_entry(queue, entry); return nil end
  if TERMINAL[status] then
    -- Its job was cancelled while a runner that then died held it: it ends now, unrun.
    end_item(id, idx, item, 'cancelled', cjson.null, 0, queue)
    redis.call('HSET', jkey(id), 'updated_at', now)
    table.insert(dropped, id)
    table.insert(dropped, idx)
    return nil
  end
  if item.status == 'queued' then
    item.status = 'running'
    redis.call('DECR', P .. 'waiting')
  end
  item.owner = consumer
  redis.call('HSET', ikey(id), idx, cjson.encode(item))
  if status == 'queued' then set_status(id, 'queued', 'running', now, '') end
  return {id, idx, item.filename, redis.call('HGET', jkey(id), 'options'), entry, queue, client}
end

-- The group's last delivered id of a stream (entries after it are new).
local function last_delivered(key)
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
    local info = {}
    for k = 1, #g, 2 do info[g[k]] = g[k + 1] end
    if info['name'] == GROUP then return info['last-delivered-id'] end
  end
  return nil
end

local function older(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end

-- The queues of the styles asked for, with their clients (a queue from before clients: anonymous).
local wanted = {}
for s = 5, #ARGV do wanted[ARGV[s]] = true end
local queues = {}
for _, queue in ipairs(redis.call('SMEMBERS', P .. 'styles')) do
  local style, client = string.match(queue, '^([^:]+):(.+)$')
  if not style then style, client = queue, 'anonymous' end
  if wanted[style] and redis.call('EXISTS', qkey(queue)) == 1 then
    table.insert(queues, {queue, client})
  end
end

-- First, items whose holder has not renewed its lease (it died, or lost Redis for that long).
for _, q in ipairs(queues) do
  local cursor = '0-0'
  for _ = 1, 16 do
    local r = redis.call('XAUTOCLAIM', qkey(q[1]), GROUP, consumer, lease, cursor, 'COUNT', 1)
    cursor = r[1]
    local entry = r[2][1]
    if entry then
      local got = take(q[1], q[2], entry[1], entry[2])
      if got then return {got, dropped} end
    end
    if cursor == '0-0' then break end
  end
end

-- Then a new entry: clients take turns (the smallest start tag, the older entry among equals),
-- each client's queue in order (its oldest job first); stale entries (their job cancelled or
-- deleted) are dropped on the way.
local vtime = tonumber(redis.call('GET', P .. 'vtime') or '0')
local function start(client)
  return math.max(vtime, tonumber(redis.call('HGET', P .. 'finish', client) or '0'))
end
for _ = 1, 64 do
  local best, best_start, best_id = nil, nil, nil
  for _, q in ipairs(queues) do
    local last = last_delivered(qkey(q[1]))
    if last then
      local nxt = redis.call('XRANGE', qkey(q[1]), '(' .. last, '+', 'COUNT', 1)
      if #nxt > 0 then
        local s = start(q[2])
        if best == nil or s < best_start or (s == best_start and older(nxt[1][1], best_id)) then
          best, best_start, best_id = q, s, nxt[1][1]
        end
      end
    end
  end
  if not best then break end
  local r = redis.call('XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', 1, 'STREAMS', qkey(best[1]), '>')
  local entry = r and r[1] and r[1][2][1]
  if entry then
    local got = take(best[1], best[2], entry[1], entry[2])
    if got then
      redis.call('SET', P .. 'vtime', tostring(best_start))
      redis.call('HSET', P .. 'finish', best[2], tostring(best_start + 1))
      return {got, dropped}
    end
  end
end
return {{}, dropped}
"""
)

#: ARGV: prefix, consumer, queue, entry. 1 if the consumer still holds the entry (its idle time is
#: reset: the lease starts again), 0 if another consumer took it or it is gone.
RENEW: Final = (
    _PRELUDE
    + r"""
local consumer, queue, entry = ARGV[2], ARGV[3], ARGV[4]
if holder(queue, entry) ~= consumer then return 0 end
redis.call('XCLAIM', qkey(queue), GROUP, consumer, 0, entry, 'JUSTID')
return 1
"""
)

#: ARGV: prefix, consumer, queue, entry, job id, index, status, error JSON, faces, timings JSON,
#: result bytes, now, expires_at. ``'ok'`` (recorded), ``'gone'`` (no such job) or ``'lost'``
#: (another runner holds the item, or it has ended: nothing changes).
FINISH: Final = (
    _PRELUDE
    + r"""
local consumer, queue, entry, id, idx = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local status, now = redis.call('HGET', jkey(id), 'status'), ARGV[12]
if not status then return 'gone' end
if holder(queue, entry) ~= consumer then return 'lost' end
local raw = redis.call('HGET', ikey(id), idx)
if not raw then return 'gone' end
local item = cjson.decode(raw)
if item.entry ~= entry or ENDED[item.status] then
  drop_entry(queue, entry)
  return 'lost'
end
local function json_or_null(s) if s == '' then return cjson.null end return cjson.decode(s) end
item.faces_stylized = ARGV[9] == '' and cjson.null or tonumber(ARGV[9])
item.timings_ms = json_or_null(ARGV[10])
end_item(id, idx, item, ARGV[7], json_or_null(ARGV[8]), tonumber(ARGV[11]), queue)
redis.call('HSET', jkey(id), 'updated_at', now)
if tonumber(redis.call('HGET', jkey(id), 'left')) <= 0 and not TERMINAL[status] then
  set_status(id, status, 'succeeded', now, ARGV[13])
end
return 'ok'
"""
)

#: ARGV: prefix, consumer, queue, entry, job id, index, now. ``'queued'`` (back in the queue as a new
#: entry), ``'cancelled'`` (its job was cancelled meanwhile: the item ends), or ``'lost'``.
RELEASE: Final = (
    _PRELUDE
    + r"""
local consumer, queue, entry, id, idx, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
if holder(queue, entry) ~= consumer then return 'lost' end
local status = redis.call('HGET', jkey(id), 'status')
local raw = status and redis.call('HGET', ikey(id), idx)
if not raw then drop_entry(queue, entry); return 'lost' end
local item = cjson.decode(raw)
if item.entry ~= entry or item.status ~= 'running' then drop_entry(queue, entry); return 'lost' end
if TERMINAL[status] then
  end_item(id, idx, item, 'cancelled', cjson.null, 0, queue)
  redis.call('HSET', jkey(id), 'updated_at', now)
  return 'cancelled'
end
-- Re-added and acked in one step: the item is never both in the queue and held, nor in neither.
item.entry = redis.call('XADD', qkey(queue), '*', 'job', id, 'index', idx)
item.status = 'queued'
item.owner = nil
redis.call('HSET', ikey(id), idx, cjson.encode(item))
redis.call('INCR', P .. 'waiting')
drop_entry(queue, entry)
return 'queued'
"""
)

#: ARGV: prefix, job id, now, expires_at. 0: no such job; 1: cancelled (or had ended already).
CANCEL: Final = (
    _PRELUDE
    + r"""
local id, now, expires = ARGV[2], ARGV[3], ARGV[4]
local status = redis.call('HGET', jkey(id), 'status')
if not status then return 0 end
if TERMINAL[status] then return 1 end
local queue = jqueue(id)
local items = redis.call('HGETALL', ikey(id))
for k = 1, #items, 2 do
  local item = cjson.decode(items[k + 1])
  -- A running item is left to its runner, which stops it between stages and records it.
  if item.status == 'queued' then end_item(id, items[k], item, 'cancelled', cjson.null, 0, queue) end
end
set_status(id, status, 'cancelled', now, expires)
return 1
"""
)

#: ARGV: prefix, job id, message, the items' error JSON, now, expires_at. 0: no such job; 1: failed
#: (or had ended already).
FAIL: Final = (
    _PRELUDE
    + r"""
local id, now, expires = ARGV[2], ARGV[5], ARGV[6]
local status = redis.call('HGET', jkey(id), 'status')
if not status then return 0 end
if TERMINAL[status] then return 1 end
local queue = jqueue(id)
local err = cjson.decode(ARGV[4])
local items = redis.call('HGETALL', ikey(id))
for k = 1, #items, 2 do
  local item = cjson.decode(items[k + 1])
  -- Running items end too: their entries are dropped, so their runners' leases are lost.
  if not ENDED[item.status] then end_item(id, items[k], item, 'error', err, 0, queue) end
end
redis.call('HSET', jkey(id), 'error', ARGV[3])
set_status(id, status, 'failed', now, expires)
return 1
"""
)

#: ARGV: prefix, job id. 1 if the job was there (its records are gone now), 0 if not.
DELETE: Final = (
    _PRELUDE
    + r"""
local id = ARGV[2]
local j = redis.call('HMGET', jkey(id), 'status', 'client', 'bytes', 'idempotency_key')
if not j[1] then return 0 end
local queue = jqueue(id)
local items = redis.call('HGETALL', ikey(id))
for k = 1, #items, 2 do
  local item = cjson.decode(items[k + 1])
  if item.status == 'queued' then redis.call('DECR', P .. 'waiting') end
  if not ENDED[item.status] then drop_entry(queue, item.entry) end
end
redis.call('DECRBY', P .. 'usage', tonumber(j[3]))
redis.call('ZREM', P .. 'created', id)
if j[2] then redis.call('ZREM', P .. 'client:' .. j[2], id) end
redis.call('ZREM', P .. 'status:' .. j[1], id)
redis.call('ZREM', P .. 'expiry', id)
redis.call('SREM', P .. 'webhooks', id)
if j[4] ~= '' and redis.call('GET', P .. 'idem:' .. j[4]) == id then
  redis.call('DEL', P .. 'idem:' .. j[4])
end
redis.call('DEL', jkey(id), ikey(id))
return 1
"""
)

#: ARGV: prefix, job id, state. Nothing for a job that is gone (never recreates its hash).
SET_WEBHOOK_STATE: Final = (
    _PRELUDE
    + r"""
local id, state = ARGV[2], ARGV[3]
if redis.call('EXISTS', jkey(id)) == 0 then return 0 end
redis.call('HSET', jkey(id), 'webhook_state', state)
if state == 'pending' then
  redis.call('SADD', P .. 'webhooks', id)
else
  redis.call('SREM', P .. 'webhooks', id)
end
return 1
"""
)

#: ARGV: prefix, idle (ms). Removes consumers (dead runners) that hold nothing and have not been seen
#: for that long; one that holds entries is kept, or its entries would leave the pending list unrun.
PRUNE_CONSUMERS: Final = (
    _PRELUDE
    + r"""
local idle, removed = tonumber(ARGV[2]), 0
for _, queue in ipairs(redis.call('SMEMBERS', P .. 'styles')) do
  if redis.call('EXISTS', qkey(queue)) == 1 then
    for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', qkey(queue), GROUP)) do
      local info = {}
      for k = 1, #c, 2 do info[c[k]] = c[k + 1] end
      if info['pending'] == 0 and info['idle'] > idle then
        redis.call('XGROUP', 'DELCONSUMER', qkey(queue), GROUP, info['name'])
        removed = removed + 1
      end
    end
  end
end
return removed
"""
)
