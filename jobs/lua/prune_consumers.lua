-- ARGV: prefix, idle (ms). Removes consumers (dead runners) that hold nothing and have not been seen
-- for that long; one that holds entries is kept, or its entries would leave the pending list unrun.
local idle, removed = tonumber(ARGV[2]), 0
for _, queue in ipairs(redis.call('SMEMBERS', P .. 'styles')) do
  if redis.call('EXISTS', qkey(queue)) == 1 then
    for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', qkey(queue), GROUP)) do
      local info = {}
      for k = 1, #c, 2 do info[c[k]] = c[k + 1] end
      if info['pending'] == 0 and info['idle'] > idle then
        redis.call('XGROUP', 'DELCONSUMER', qkey(queue), GROUP, info['name'])
        removed = removed + 1
      end
    end
  end
end
return removed
