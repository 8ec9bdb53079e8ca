-- ARGV: prefix, job id, now, expires_at. 0: no such job; 1: cancelled (or had ended already).
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
