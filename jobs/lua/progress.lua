-- ARGV: prefix, consumer, queue, entry, job id, index, frames done, now. 'ok' (recorded, or already
-- as far), 'gone' (no such job) or 'lost' (another runner holds the item, or it has ended).
local consumer, queue, entry, id, idx = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local done, now = tonumber(ARGV[7]), ARGV[8]
if not redis.call('HGET', jkey(id), 'status') then return 'gone' end
if holder(queue, entry) ~= consumer then return 'lost' end
local raw = redis.call('HGET', ikey(id), idx)
if not raw then return 'gone' end
local item = cjson.decode(raw)
if item.entry ~= entry or ENDED[item.status] then return 'lost' end
if type(item.frames_done) ~= 'number' or item.frames_done < done then
  item.frames_done = done
  redis.call('HSET', ikey(id), idx, cjson.encode(item))
  redis.call('HSET', jkey(id), 'updated_at', now)
end
return 'ok'
