-- Claim up to ARGV[3] ready jobs and start them, in one round trip; arq claims one job per four
-- round trips (WATCH, EXISTS, ZSCORE, MULTI/PSETEX/EXEC) and starts it with a fifth, and each of
-- those waits behind every Lua call another job has queued on the one Redis thread.
--
-- ARGV[1] queue key   ARGV[2] now (ms)   ARGV[3] jobs wanted   ARGV[4] in-progress key prefix
-- ARGV[5] claim TTL (ms)   ARGV[6] queue entries read at a time   ARGV[7] job key prefix
-- ARGV[8] retry key prefix   ARGV[9] retry key TTL (s)   ARGV[10] most queue entries to look at
--
-- Running jobs stay at the head of the queue (as in arq), so the head holds every worker's
-- running jobs: the queue is read a page at a time until enough jobs are claimed, however many
-- workers there are.
--
-- A job is claimed exactly as arq claims it: its in-progress key is set (with arq's TTL, so a
-- crashed worker's jobs run again once it expires), and only if it was not set. It is then
-- started as arq's run_job starts it: its body is read and its try counter incremented (arq's
-- retry key, kept ARGV[9] seconds). Jobs stay in the queue until they finish, as in arq.
-- Returns {id, score, body or false, try, id, score, body, try, ...}.
local want, page, most = tonumber(ARGV[3]) * 4, tonumber(ARGV[6]), tonumber(ARGV[10])
local claimed, offset = {}, 0
while #claimed < want and offset < most do
  local ready = redis.call('ZRANGEBYSCORE', ARGV[1], '-inf', ARGV[2], 'WITHSCORES', 'LIMIT',
    offset, page)
  for i = 1, #ready, 2 do
    local id = ready[i]
    if redis.call('SET', ARGV[4] .. id, '1', 'PX', ARGV[5], 'NX') then
      local retry = ARGV[8] .. id
      local try = redis.call('INCR', retry)
      redis.call('EXPIRE', retry, ARGV[9])
      claimed[#claimed + 1] = id
      claimed[#claimed + 1] = ready[i + 1]
      claimed[#claimed + 1] = redis.call('GET', ARGV[7] .. id)
      claimed[#claimed + 1] = try
      if #claimed >= want then
        break
      end
    end
  end
  if #ready < page * 2 then
    break
  end
  offset = offset + page
end
return claimed
