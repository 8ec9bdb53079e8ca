-- ARGV: prefix, job id. 1 if the job was there (its records are gone now), 0 if not.
local id = ARGV[2]
local j = redis.call('HMGET', jkey(id), 'status', 'client', 'bytes', 'idempotency_key', 'account')
if not j[1] then return 0 end
local queue = jqueue(id)
local items = redis.call('HGETALL', ikey(id))
for k = 1, #items, 2 do
  local item = cjson.decode(items[k + 1])
  if item.status == 'queued' then redis.call('DECR', P .. 'waiting') end
  if not ENDED[item.status] then drop_entry(queue, item.entry) end
end
redis.call('DECRBY', P .. 'usage', tonumber(j[3]))
if j[5] and j[5] ~= '' then redis.call('DECRBY', P .. 'usage:' .. j[5], tonumber(j[3])) end
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
