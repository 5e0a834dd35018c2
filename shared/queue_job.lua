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

-- A step call sent twice (the client lost the reply of a call Redis ran, and retried it) must
-- not run twice: it would write its events again and take the events after them off the list
-- unwritten. Each call carries a new id; `replayed` gives the reply the call of that id gave
-- for `list` (or nil), and `remember` stores it (one field of the hash `steps` per list).
local function replayed(steps, list, step_id)
  local done = redis.call('HGET', steps, list)
  if done then
    local d = cmsgpack.unpack(done)
    if d[1] == step_id then
      return d[2]
    end
  end
  return nil
end

local function remember(steps, list, step_id, reply)
  redis.call('HSET', steps, list, cmsgpack.pack({step_id, reply}))
  return reply
end
