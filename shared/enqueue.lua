-- Queue a batch of events in their users' lanes, atomically with the duplicate check.
--
-- ARGV[1] dedupe window (s)   ARGV[2] lane key prefix     ARGV[3] lane-job key prefix
-- ARGV[4] arq job-key prefix  ARGV[5] arq queue key       ARGV[6] job-id prefix
-- ARGV[7] now (ms)            ARGV[8] job key TTL (ms)
-- ARGV[9] '1': skip an event whose id was seen within the window; '0': queue every event
--         (a dead letter replayed) and mark it queued
-- ARGV[10] the lanes, one MessagePack array of {lane number, {seen key, ...}}: each event's
--          seen key (`fb:seen:<id>`) whole (joined here, it made and hashed one more Lua string
--          per event: 3% of the call)
-- ARGV[11..] the events' JSON, lane by lane, in the order of their keys in ARGV[10]
--
-- New events are appended to their lane's list in the order given. A lane that no job owns
-- gets one (arq's layout: {t, f = 'lane', a = {}, k = {lane = n}, et}), recorded as the lane's
-- owner; a lane that has one leaves it to drain the new events too (workers/lanes.py ends a
-- job only when its lane is empty, in the call that empties it). Returns the number of new
-- events.
local window, lane_prefix, owner_prefix = ARGV[1], ARGV[2], ARGV[3]
local job_prefix, queue, id_prefix = ARGV[4], ARGV[5], ARGV[6]
local now, job_ttl, check = tonumber(ARGV[7]), ARGV[8], ARGV[9] == '1'

-- Push ARGV[first..last] but the duplicates (ARGV positions in `dup`) onto `list`, 1,000 at a
-- time (unpack is bounded by Lua's stack: about 8,000 values); with none, straight from ARGV.
local function push(list, first, last, dup)
  local from = ARGV
  if next(dup) then
    from = {}
    for i = first, last do
      if not dup[i] then
        from[#from + 1] = ARGV[i]
      end
    end
    first, last = 1, #from
  end
  for i = first, last, 1000 do
    redis.call('RPUSH', list, unpack(from, i, math.min(i + 999, last)))
  end
  return last - first + 1
end

local arg, new = 11, 0
for _, lane in ipairs(cmsgpack.unpack(ARGV[10])) do
  local n, ids, dup, dups = lane[1], lane[2], {}, 0
  for i, key in ipairs(ids) do
    if not check then
      redis.call('SET', key, 'q', 'EX', window)
    elseif not redis.call('SET', key, 'q', 'EX', window, 'NX') then
      dup[arg + i - 1], dups = true, dups + 1
    end
  end
  local first, last = arg, arg + #ids - 1
  arg = last + 1
  if dups < #ids then
    -- A lane that cannot take them (its key of another type: another program's) leaves the
    -- events it marked unmarked, so that Facebook's retry of the 503 queues them, not drops
    -- them as seen. The lanes before it keep theirs: they are queued.
    local ok, pushed = pcall(push, lane_prefix .. n, first, last, dup)
    if not ok then
      for i, key in ipairs(ids) do
        if check and not dup[first + i - 1] then
          redis.call('DEL', key)
        end
      end
      return redis.error_reply('LANE ' .. n .. ' refused the events: ' ..
        (type(pushed) == 'table' and pushed.err or tostring(pushed)))
    end
    new = new + pushed
    if redis.call('EXISTS', owner_prefix .. n) == 0 then
      queue_job(owner_prefix .. n, job_prefix, queue, id_prefix .. n, 'lane', n, now, now, job_ttl)
    end
  end
end
return new
