-- ARGV: prefix, job id, options JSON, style, now, expires_at, webhook, idempotency key, quota, needed
-- bytes, items JSON (a list of item objects), client, account, the account's quota ('' for none),
-- bytes of stray temporary files, the traceparent and tracestate of the request that made it. Returns {'created'}, {'exists', id} (the key is known),
-- {'account_quota', the account's usage} or {'quota', used}.
local id, style, now, client = ARGV[2], ARGV[4], ARGV[5], ARGV[12]
local queue = style .. ':' .. client
-- A client that retried after a lost reply: the first call did it.
if redis.call('EXISTS', jkey(id)) == 1 then return {'created'} end
local idem = ARGV[8]
if idem ~= '' then
  local existing = redis.call('GET', P .. 'idem:' .. idem)
  if existing then return {'exists', existing} end
end
local owner = ARGV[13]
local needed = tonumber(ARGV[10])
if owner ~= '' and ARGV[14] ~= '' then
  local mine = tonumber(redis.call('GET', P .. 'usage:' .. owner) or '0')
  if mine + needed > tonumber(ARGV[14]) then return {'account_quota', tostring(mine)} end
end
local used = tonumber(redis.call('GET', P .. 'usage') or '0') + tonumber(ARGV[15])
if used + needed > tonumber(ARGV[9]) then return {'quota', tostring(used)} end
redis.call('HSET', jkey(id), 'id', id, 'status', 'queued', 'options', ARGV[3], 'style', style,
  'client', client, 'queue', queue, 'created_at', now, 'updated_at', now, 'expires_at', ARGV[6],
  'webhook', ARGV[7], 'webhook_state', 'none', 'idempotency_key', idem, 'error', '', 'bytes', 0,
  'left', 0, 'account', owner, 'traceparent', ARGV[16], 'tracestate', ARGV[17])
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
