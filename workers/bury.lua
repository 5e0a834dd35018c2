-- Dead-letter the events at the head of a lane whose step call Redis refused try after try
-- (workers/lanes.py `_bury_head`), and take them off the lane, in one call that is not run
-- twice if it is sent twice (shared/queue_job.lua `replayed`), fenced as a step is
-- (workers/effects.lua): a run that no longer owns the lane gets LANELOST and writes nothing.
--
-- ARGV[1] lane key   ARGV[2] steps hash   ARGV[3] this call's id   ARGV[4] dead-letter stream
-- ARGV[5] seen-key prefix   ARGV[6] dedupe window (s)   ARGV[7] kind (unknown)   ARGV[8] error
-- ARGV[9] tries   ARGV[10] now (ms)   ARGV[11] owner key   ARGV[12] job id   ARGV[13] arq try
-- key   ARGV[14] n, then n event ids, then their n payloads, in the lane's order
-- Returns n; with n = 0 (the run read an empty lane), 0 when the lane is still empty (its owner
-- is released, as a step that empties it does) and -1 when events came in meanwhile.
local lane, steps, step_id = ARGV[1], ARGV[2], ARGV[3]
if not owns(ARGV[11], ARGV[12], ARGV[13], ARGV[9]) then
  return redis.error_reply('LANELOST this run no longer owns ' .. lane)
end
local again = replayed(steps, lane, step_id)
if again then
  return again
end
local n = tonumber(ARGV[14])
if n == 0 then
  if redis.call('LLEN', lane) > 0 then
    return -1
  end
  redis.call('DEL', ARGV[11])
  return 0
end
for i = 1, n do
  local id = ARGV[14 + i]
  redis.call('XADD', ARGV[4], '*', 'id', id, 'kind', ARGV[7], 'error', ARGV[8],
    'tries', ARGV[9], 'failed_at', ARGV[10], 'payload', ARGV[14 + n + i])
  redis.call('SET', ARGV[5] .. id, 'x', 'EX', ARGV[6])
end
redis.call('LTRIM', lane, n, -1)
return remember(steps, lane, step_id, n)
