-- Claim up to ARGV[3] ready jobs in one round trip; arq claims one job per four round trips
-- (WATCH, EXISTS, ZSCORE, MULTI/PSETEX/EXEC), and each of those waits behind every Lua call
-- another worker has queued on the one Redis thread.
--
-- ARGV[1] queue key   ARGV[2] now (ms)   ARGV[3] jobs wanted   ARGV[4] in-progress key prefix
-- ARGV[5] claim TTL (ms)   ARGV[6] queue entries to look at
--
-- A job is claimed exactly as arq claims it: its in-progress key is set (with arq's TTL, so a
-- crashed worker's jobs run again once it expires), and only if it was not set. Jobs stay in the
-- queue until they finish, as in arq. Returns {id, score, id, score, ...}.
local ready = redis.call('ZRANGEBYSCORE', ARGV[1], '-inf', ARGV[2], 'WITHSCORES', 'LIMIT', 0,
  tonumber(ARGV[6]))
local want, claimed = tonumber(ARGV[3]), {}
for i = 1, #ready, 2 do
  if redis.call('SET', ARGV[4] .. ready[i], '1', 'PX', ARGV[5], 'NX') then
    claimed[#claimed + 1] = ready[i]
    claimed[#claimed + 1] = ready[i + 1]
    if #claimed >= want * 2 then
      break
    end
  end
end
return claimed
