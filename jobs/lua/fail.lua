-- ARGV: prefix, job id, message, the items' error JSON, now, expires_at. 0: no such job; 1: failed
-- (or had ended already).
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
