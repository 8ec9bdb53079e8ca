-- ARGV: prefix, consumer, lease (ms), now, then the styles this runner can serve. Returns
-- {claim, dropped}: claim is {job id, index, filename, options, entry, queue, client,
-- traceparent, tracestate, frames ('' for a photo), first frame} or
-- empty; dropped lists 'job id, index' pairs of items ended here (their photos can go).
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
  -- A job stored before traces has no traceparent: '' (a false would cut the reply short); a
  -- photo has no frames: '' too.
  local frames, first = '', ''
  if type(item.frames) == 'number' then frames = tostring(item.frames) end
  if type(item.first_frame) == 'number' then first = tostring(item.first_frame) end
  return {id, idx, item.filename, redis.call('HGET', jkey(id), 'options'), entry, queue, client,
    redis.call('HGET', jkey(id), 'traceparent') or '', redis.call('HGET', jkey(id), 'tracestate') or '',
    frames, first}
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
