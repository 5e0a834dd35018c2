-- Give a job to every lane that has events but no live job: the safety net behind the rule
-- that a lane's owner key names a queued or running job (shared/enqueue.lua sets it, the lane's
-- last step deletes it). A job arq failed on its own (a timeout, say) leaves its owner key
-- behind with no job; this finds it within a few seconds and queues a new one.
--
-- ARGV[1] list key prefix   ARGV[2] owner key prefix   ARGV[3] arq job-key prefix
-- ARGV[4] queue key         ARGV[5] lanes               ARGV[6] new job-id prefix
-- ARGV[7] now (ms)          ARGV[8] job key TTL (ms)    ARGV[9] job function ('lane' or
--                                                       'forward', for the forward lists)
-- Returns the lanes given a new job.
local repaired = {}
for n = 0, tonumber(ARGV[5]) - 1 do
  if redis.call('EXISTS', ARGV[1] .. n) == 1 then
    local owner = redis.call('GET', ARGV[2] .. n)
    if not owner or redis.call('EXISTS', ARGV[3] .. owner) == 0 then
      local now = tonumber(ARGV[7])
      queue_job(ARGV[2] .. n, ARGV[3], ARGV[4], ARGV[6] .. n, ARGV[9], n, now, now, ARGV[8])
      repaired[#repaired + 1] = n
    end
  end
end
return repaired
