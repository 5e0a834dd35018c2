-- Prepended to every script that queues or steps a lane (shared/lanes.py `with_queue_job`).
--
-- queue_job: the one place a lane's job is spelled in Lua, in arq's layout (shared/codec.py
-- `lane_job` spells it in Python). `f` is the job function ('lane' or 'forward'), `n` the lane;
-- the job's key gets `ttl` ms, the owner key names it, and it is due at `at` (ms).
local function queue_job(owner, job_prefix, queue, job_id, f, n, now, at, ttl)
  redis.call('SET', owner, job_id)
  redis.call('PSETEX', job_prefix .. job_id, ttl,
    cmsgpack.pack({t = 1, f = f, a = {}, k = {lane = n}, et = now}))
  redis.call('ZADD', queue, at, job_id)
end

-- Whether the run `job_id`, claimed `job_try` times, still owns its lane: its owner key names
-- the job, and arq's try counter of the job (`try_key`) names the run.
local function owns(owner, job_id, try_key, job_try)
  return redis.call('GET', owner) == job_id and redis.call('GET', try_key) == tostring(job_try)
end

-- What a lane does after a step: end, its owner released in the call that empties it (so the
-- next event queues a new job); hand the lane to a new job (`queue_next`) when `handoff`; or go
-- on. Returns 'ended', 'handed' or 'more'.
local function next_step(list, owner, handoff, queue_next, now)
  if redis.call('LLEN', list) == 0 then
    redis.call('DEL', owner)
    return 'ended'
  end
  if handoff then
    queue_next(now)
    return 'handed'
  end
  return 'more'
end
