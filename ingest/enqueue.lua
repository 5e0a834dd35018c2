-- Queue a batch of events as arq jobs, atomically with the duplicate check.
--
-- ARGV[1] seen-key prefix      ARGV[2] dedupe window (s)   ARGV[3] arq job-key prefix
-- ARGV[4] arq queue key        ARGV[5] job-id prefix       ARGV[6] now (ms)
-- ARGV[7] job key TTL (ms)
-- ARGV[8] the events' dedupe ids, one MessagePack array of {id, job number, position in job}
-- ARGV[9..] the jobs, prebuilt by ingest in arq's own layout and encoded as MessagePack:
--           {t = 0, f = kind, a = [], k = {events = [...]}, et = now}, at most JOB_MAX_EVENTS
--           events each, all of one kind.
--
-- An event whose id was seen within the window is dropped from its job; a job left empty is
-- not written. Only a job that held a duplicate is decoded and rebuilt here, so the usual cost
-- per event is the one SET that records it. Returns the number of new events.
local seen, window, job_prefix, queue = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local id_prefix, now, job_ttl = ARGV[5], tonumber(ARGV[6]), ARGV[7]

local dropped, new = {}, 0
for _, e in ipairs(cmsgpack.unpack(ARGV[8])) do
  if redis.call('SET', seen .. e[1], 'q', 'EX', window, 'NX') then
    new = new + 1
  else
    local positions = dropped[e[2]]
    if positions == nil then
      positions = {}
      dropped[e[2]] = positions
    end
    positions[#positions + 1] = e[3]
  end
end

for n = 1, #ARGV - 8 do
  local body = ARGV[8 + n]
  local positions = dropped[n]
  if positions ~= nil then
    local job = cmsgpack.unpack(body)
    local events = job.k.events
    table.sort(positions, function(a, b) return a > b end)
    for _, p in ipairs(positions) do
      table.remove(events, p)
    end
    body = #events > 0 and cmsgpack.pack(job) or nil
  end
  if body ~= nil then
    local job_id = id_prefix .. n
    redis.call('PSETEX', job_prefix .. job_id, job_ttl, body)
    redis.call('ZADD', queue, now, job_id)
  end
end
return new
