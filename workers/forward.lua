-- One step of a forward lane's job (workers/forward.py): take the delivered events off the
-- lane, deal with the one that failed, and decide what the lane does next, atomically and fenced
-- to the run that owns the lane (as workers/effects.lua does for a lane of events).
--
-- ARGV[1] the step, one MessagePack array:
--   {list key, owner key, job id, arq try key, job try, delivered, failed, mode, next job id,
--    lane number, queue, now ms, tries key, dead-letter stream, arq job prefix, job TTL ms,
--    id of the first event delivered, steps hash, this call's id (shared/queue_job.lua)}
--   delivered: how many events at the head were delivered; failed: false, or
--   {id, status, answer, error, give up (1/0), retry at ms} for the event right after them;
--   mode: 'more' or 'handoff' (the run's time is up).
-- A dead letter names its lane, for `fbhook forward dead replay` (the user key is not in the
-- record, so the lane cannot be found again from it).
-- Returns {status, tries}: status 'more', 'ended', 'handed' or 'retry' ('dead ' first when
-- an event was dead-lettered), and the failed event's tries so far.
local s = cmsgpack.unpack(ARGV[1])
local list, owner, job_id, delivered, failed = s[1], s[2], s[3], s[6], s[7]
if not owns(owner, job_id, s[4], s[5]) then
  return redis.error_reply('LANELOST this run no longer owns ' .. list)
end
local steps, step_id = s[18], s[19]
local again = replayed(steps, list, step_id)
if again then
  return again
end

local tries_key, now = s[13], tonumber(s[12])
if delivered > 0 then
  redis.call('LTRIM', list, delivered, -1)
  redis.call('HDEL', tries_key, s[17])  -- only a lane's head event is ever retried
end

local function queue_next(at)
  queue_job(owner, s[15], s[11], s[9], 'forward', s[10], now, at, s[16])
end

local status, tries = '', 0
if failed then
  tries = redis.call('HINCRBY', tries_key, failed[1], 1)
  if failed[5] ~= 1 then
    queue_next(failed[6])
    return remember(steps, list, step_id, {'retry', tries})
  end
  redis.call('XADD', s[14], '*', 'id', failed[1], 'lane', s[10], 'status', failed[2],
    'answer', string.sub(failed[3], 1, 500), 'error', string.sub(failed[4], 1, 500),
    'tries', tries, 'failed_at', now, 'payload', redis.call('LINDEX', list, 0) or '')
  redis.call('HDEL', tries_key, failed[1])
  redis.call('LPOP', list)
  status = 'dead '
end

return remember(steps, list, step_id,
  {status .. next_step(list, owner, s[8] == 'handoff', queue_next, now), tries})
