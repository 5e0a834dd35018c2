-- Prepended to every script that queues a lane's job (shared/lanes.py `script`): the one place a
-- job is spelled in Lua, in arq's layout (shared/codec.py `lane_job` spells it in Python).
-- `f` is the job function ('lane' or 'forward'), `n` the lane; the job's key gets `ttl` ms, its
-- owner key names it, and it is due at `at` (ms).
local function queue_job(owner, job_prefix, queue, job_id, f, n, now, at, ttl)
  redis.call('SET', owner, job_id)
  redis.call('PSETEX', job_prefix .. job_id, ttl,
    cmsgpack.pack({t = 1, f = f, a = {}, k = {lane = n}, et = now}))
  redis.call('ZADD', queue, at, job_id)
end
