-- ARGV: prefix, job id, state. Nothing for a job that is gone (never recreates its hash).
local id, state = ARGV[2], ARGV[3]
if redis.call('EXISTS', jkey(id)) == 0 then return 0 end
redis.call('HSET', jkey(id), 'webhook_state', state)
if state == 'pending' then
  redis.call('SADD', P .. 'webhooks', id)
else
  redis.call('SREM', P .. 'webhooks', id)
end
return 1
