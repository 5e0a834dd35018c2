-- Queue a batch of events as arq jobs, atomically with the duplicate check.
--
-- ARGV[1] seen-key prefix      ARGV[2] dedupe window (s)   ARGV[3] arq job-key prefix
-- ARGV[4] arq queue key        ARGV[5] job-id prefix       ARGV[6] now (ms)
-- ARGV[7] job key TTL (ms)     ARGV[8] max events per job
-- ARGV[9] the events, one MessagePack array of {dedupe id, kind (the job function), event JSON}
--         (one argument, not three per event: packing arguments cost more than the script).
--
-- An event whose id was seen within the window is skipped. The rest are grouped by kind into
-- arq jobs of at most ARGV[8] events, written in arq's own layout and encoded as MessagePack:
-- {t = 0, f = kind, a = [], k = {events = [...]}, et = now}. Returns the number of new events.
local seen, window, job_prefix, queue = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local id_prefix, now, job_ttl = ARGV[5], tonumber(ARGV[6]), ARGV[7]
local max_events = tonumber(ARGV[8])

local open, jobs, new = {}, {}, 0
for _, e in ipairs(cmsgpack.unpack(ARGV[9])) do
  if redis.call('SET', seen .. e[1], 'q', 'EX', window, 'NX') then
    local kind = e[2]
    local events = open[kind]
    if events == nil or #events >= max_events then
      events = {}
      open[kind] = events
      jobs[#jobs + 1] = {kind, events}
    end
    events[#events + 1] = e[3]
    new = new + 1
  end
end

for n, job in ipairs(jobs) do
  local job_id = id_prefix .. n
  local body = cmsgpack.pack({t = 0, f = job[1], a = {}, k = {events = job[2]}, et = now})
  redis.call('PSETEX', job_prefix .. job_id, job_ttl, body)
  redis.call('ZADD', queue, now, job_id)
end
return new
