-- ARGV: prefix, consumer, queue, entry, job id, index, status, error JSON, faces, timings JSON,
-- result bytes, now, expires_at. 'ok' (recorded), 'gone' (no such job) or 'lost'
-- (another runner holds the item, or it has ended: nothing changes).
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
