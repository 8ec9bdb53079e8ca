-- ARGV: prefix, consumer, queue, entry, job id, index, now. 'queued' (back in the queue as a new
-- entry), 'cancelled' (its job was cancelled meanwhile: the item ends), or 'lost'.
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
