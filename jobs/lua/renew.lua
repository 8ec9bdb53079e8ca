-- ARGV: prefix, consumer, queue, entry. 1 if the consumer still holds the entry (its idle time is
-- reset: the lease starts again), 0 if another consumer took it or it is gone.
local consumer, queue, entry = ARGV[2], ARGV[3], ARGV[4]
if holder(queue, entry) ~= consumer then return 0 end
redis.call('XCLAIM', qkey(queue), GROUP, consumer, 0, entry, 'JUSTID')
return 1
