-- One step of a lane's job (workers/lanes.py): the built-in outputs of the events at the head of
-- the lane, their removal from it, and what the lane does next, in one atomic call.
--
-- ARGV[1] dedupe window (s)    ARGV[2] stream MAXLEN       ARGV[3] history cap
-- ARGV[4] referrals stream     ARGV[5] report ad titles    ARGV[6] report retention (s)
-- ARGV[7..10] key prefixes: seen, event stream, attribution, report day
-- ARGV[11] the events, one flat MessagePack array of WIDTH values per event, the lane's head in
--          order (one argument instead of a dozen per event; flat, because a Lua table grown
--          per event, with the timestamp as a number Redis formats for XADD, cost 8% of the
--          call: bench.instructions):
--   id, kind, channel, page id, user, timestamp ms (as text),
--   touch, touch JSON, day, ad title, object, sender, forward record or false
--   where user is the key of the sender's attribution record (shared/identity.py), sender the
--   id as sent, and touch a positional array (shared/attribution.py POSITIONS) or false.
-- ARGV[12] the step, one MessagePack array (workers/effects.py Step):
--   {lane key, owner key, job id, arq try key, job try, failed, mode, next job id, lane number,
--    queue, now ms, max tries, tries key, dead-letter stream, arq job prefix, job TTL ms,
--    backoffs: the wait in ms before try n + 1, by n, forward list key, forward owner key,
--    forward job id (queued for the forward list if it has no job), steps hash, this call's
--    id (shared/queue_job.lua `replayed`)}
--   failed: false, or {id, kind, error} of the event right after the rows, which failed before
--   it could be written; mode: 'more' (the job goes on while the lane has events) or 'handoff'
--   (its time is up: a new job takes the lane over).
-- ARGV[13..] two per event, in the same order: its event JSON, and its raw item exactly as
--   Facebook sent it (arguments of their own: Lua copies a string out of MessagePack again,
--   about 1 us an event of Redis time; shared/packed_call.py).
--
-- Fencing: only the run that owns the lane writes. The lane's owner key names the job, and arq's
-- try counter of that job names the run (every claim increments it): a run presumed dead (its
-- lease expired while it was frozen) whose job was claimed again, or handed on, gets LANELOST
-- and writes nothing. Exactly once in effect follows: an event leaves the lane in the call that
-- writes its outputs, so no later run can write it again.
--
-- A write that fails part way (a key of the wrong type, say) keeps the events written before it,
-- removes them from the lane, and counts the event it failed on as failed: the head event is
-- retried (its tries are counted in the tries hash; the lane's next job is queued after the
-- backoff of that try) and after `max tries` dead-lettered alone, with its payload,
-- and the lane goes on. The lane's owner key is deleted in the call that leaves the lane empty,
-- so ingest queues a new job for the next event (shared/enqueue.lua).
--
-- Returns {codes, status, tries, counts error}: one code per event written (1 written, 2 with a
-- touch for a new user, 3 with a touch for a returning user), the status ('more', 'ended',
-- 'handed', 'retry', each after 'dead' when an event was dead-lettered: 'dead more', ...), the
-- failed event's tries (0 if none) and why the report's counters were not written (or false).
-- The worker sends a plain LRANGE of the lane right behind this call
-- (shared/packed_call.py `then`): its reply is the lane's next head when the status ends in
-- 'more', one round trip per step, at a tenth of the Redis time of the same read in here
-- (Lua copies every event in and out again).
local window, maxlen, cap, referrals = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local ad_titles, retention = ARGV[5], tonumber(ARGV[6])
local seen_prefix, stream_prefix, attr_prefix, day_prefix = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local step = cmsgpack.unpack(ARGV[12])
local lane, owner, job_id, try_key, job_try, failed, mode = step[1], step[2], step[3], step[4],
  step[5], step[6], step[7]

if not owns(owner, job_id, try_key, job_try) then
  return redis.error_reply('LANELOST this run no longer owns ' .. lane)
end

local steps, step_id = step[21], step[22]
local again = replayed(steps, lane, step_id)
if again then
  return again
end

-- Positions in a stored touch (1-based), filled in from shared/attribution.py POSITIONS by
-- workers/effects.py when the script is loaded.
local T, SOURCE, REF, AD, TIE, PRODUCT = POSITIONS

-- Whether touch a is later than touch b: by timestamp, equal timestamps by their tie-break (a
-- number derived from the event id), so arrival order never decides first or last touch.
local function later(a, b)
  if a[T] ~= b[T] then
    return a[T] > b[T]
  end
  return (a[TIE] or 0) > (b[TIE] or 0)
end

-- Insert a touch into the user's record {count, first, history}: history latest first, capped;
-- the earliest touch ever seen survives as `first` once it falls out of the history.
local function add_touch(key, touch, stored)
  local record = stored and cmsgpack.unpack(stored) or {0, false, {}}
  local history = record[3]
  local pos = #history + 1
  for j = 1, #history do
    if later(touch, history[j]) then
      pos = j
      break
    end
  end
  table.insert(history, pos, touch)
  if #history > cap then
    local dropped = table.remove(history)
    if not record[2] or later(record[2], dropped) then
      record[2] = dropped
    end
  end
  record[1] = record[1] + 1
  redis.call('SET', key, cmsgpack.pack(record))
  return record[1], history[1]
end

-- The report (shared/report.py). A user counts once per UTC day: as new on the day of their
-- first touch ever, else as returning, under the source, ref and ad of their first touch that
-- day. Keys of a day `<day_key>:<part>`: `n` a hash of exact `new` and `ret` users and
-- `touches`; `new` and `ret` HyperLogLogs of those users (merged, they count distinct users
-- over a range); `<dimension>` a sorted set row -> users, `<dimension>:new` row -> new users.
-- Counts are summed over the batch and written once per key and member (a campaign's touches
-- share a handful of members); every key expires `retention` seconds after its day ends.
local SHOPS_PRODUCT = '(shops product)'  -- shared/report.py SHOPS_PRODUCT
local hashes, zsets, users, expiry, titles = {}, {}, {}, {}, {}

local function add(sums, key, member, at)
  local members = sums[key]
  if not members then
    members = {}
    sums[key] = members
    expiry[key] = at
  end
  members[member] = (members[member] or 0) + 1
end

-- Whether the user's record (just written) holds a touch on `day` (days since the epoch) other
-- than `touch`: the user was counted that day already. The history keeps the latest touches, so
-- only a touch that arrives older than all of them can miss an earlier one of its day.
local function counted_on(user_key, touch, day)
  local record = cmsgpack.unpack(redis.call('GET', user_key))
  local function other(t)
    return t and math.floor(t[T] / 86400000) == day
      and not (t[T] == touch[T] and (t[TIE] or 0) == (touch[TIE] or 0))
  end
  if other(record[2]) then
    return true
  end
  for _, t in ipairs(record[3]) do
    if other(t) then
      return true
    end
  end
  return false
end

local function count_row(day_key, dimension, key, side, at)
  add(zsets, day_key .. ':' .. dimension, key, at)
  if side == 'new' then
    add(zsets, day_key .. ':' .. dimension .. ':new', key, at)
  end
end

-- `count` is the user's touches so far (1: this is their first), `user_key` their record's key.
local function count_touch(day_key, touch, count, title, user_key)
  local day = math.floor(touch[T] / 86400000)
  local at = day * 86400 + 86400 + retention
  add(hashes, day_key .. ':n', 'touches', at)
  if touch[AD] and title then
    titles[touch[AD]] = title
  end
  local side = count == 1 and 'new' or 'ret'
  if side == 'ret' and counted_on(user_key, touch, day) then
    return
  end
  add(hashes, day_key .. ':n', side, at)
  local hll = day_key .. ':' .. side
  if not users[hll] then
    users[hll] = {}
    expiry[hll] = at
  end
  table.insert(users[hll], user_key)
  count_row(day_key, 'source', touch[SOURCE] or (touch[PRODUCT] and SHOPS_PRODUCT) or '', side, at)
  if touch[REF] then
    count_row(day_key, 'ref', touch[REF], side, at)
  end
  if touch[AD] then
    count_row(day_key, 'ad', touch[AD], side, at)
  end
end

local function write_counts()
  for key, fields in pairs(hashes) do
    for field, by in pairs(fields) do
      redis.call('HINCRBY', key, field, by)
    end
  end
  for key, members in pairs(zsets) do
    for member, by in pairs(members) do
      redis.call('ZINCRBY', key, by, member)
    end
  end
  for key, list in pairs(users) do
    for i = 1, #list, 1000 do
      redis.call('PFADD', key, unpack(list, i, math.min(i + 999, #list)))
    end
  end
  for key, at in pairs(expiry) do
    redis.call('EXPIREAT', key, at)
  end
  for ad, title in pairs(titles) do
    redis.call('HSET', ad_titles, ad, title)
  end
end

local function null(value)
  return value or cjson.null
end

-- The _fbRef* variables of a user's last touch (seed 001), as JSON; `fbref` adds `__fbref__`.
local function vars_of(last, fbref)
  local vars = {
    _fbRefSource = null(last and last[SOURCE]), _fbRefParam = null(last and last[REF]),
    _fbRefAdId = null(last and last[AD]),
  }
  if fbref ~= nil then
    vars.__fbref__ = fbref
  end
  return cjson.encode(vars)
end

-- Forwarding (FORWARD_URL): the event goes to its lane's forward list with the user's attribution
-- at the time of the event, and whether it is a referral moment; workers/forward.py delivers it.
local forwarded = false
local function forward(record, user, last)
  local fbref = last ~= nil
  if not last and user ~= '' then
    local stored = redis.call('GET', attr_prefix .. user)
    last = stored and cmsgpack.unpack(stored)[3][1] or nil
  end
  redis.call('RPUSH', step[18], record .. '\n' .. vars_of(last, fbref))
  forwarded = true
end

-- One event's writes, all or none: what a write that fails part way had written of that event
-- is undone (its stream entries deleted, the user's record put back), so that the retried
-- event is never written twice; it is counted in the report only once all its writes are in.
-- The event being written keeps what it wrote in these (no table per event: the hot path).
local WIDTH = ROW_WIDTH
local out, rows, written = {}, cmsgpack.unpack(ARGV[11]), 0
local u_stream, u_entry, u_key, u_stored, u_referral

local function write_all()
  for n = 1, #rows / WIDTH do
    local b = (n - 1) * WIDTH
    local id, kind, user, touch = rows[b + 1], rows[b + 2], rows[b + 5], rows[b + 7]
    u_stream, u_entry, u_key, u_referral = stream_prefix .. kind, nil, nil, nil
    u_entry = redis.call('XADD', u_stream, 'MAXLEN', '~', maxlen, '*',
      'id', id, 'kind', kind, 'channel', rows[b + 3], 'object', rows[b + 11],
      'page_id', rows[b + 4], 'sender', rows[b + 12], 'user', user, 'timestamp', rows[b + 6],
      'event', ARGV[11 + 2 * n],
      'raw', ARGV[12 + 2 * n])
    local code, last, count = 1, nil, nil
    if touch then
      local key = attr_prefix .. user
      local stored = redis.call('GET', key)
      count, last = add_touch(key, touch, stored)
      u_key, u_stored = key, stored
      code = count > 1 and 3 or 2
      u_referral = redis.call('XADD', referrals, 'MAXLEN', '~', maxlen, '*',
        'user', user, 'object', rows[b + 11], 'returning', count > 1 and '1' or '0',
        'touches', count, 'touch', rows[b + 8], 'vars', vars_of(last))
    end
    if rows[b + 13] then
      forward(rows[b + 13], user, last)
    end
    if touch then
      count_touch(day_prefix .. rows[b + 9], touch, count, rows[b + 10], attr_prefix .. user)
    end
    out[n] = code
    written = n
  end
end

local function undo_failed_event()
  if u_referral then
    pcall(redis.call, 'XDEL', referrals, u_referral)
  end
  if u_key then
    if u_stored then
      pcall(redis.call, 'SET', u_key, u_stored)
    else
      pcall(redis.call, 'DEL', u_key)
    end
  end
  if u_entry then
    pcall(redis.call, 'XDEL', u_stream, u_entry)
  end
end

local ok, err = pcall(write_all)
if not ok then
  undo_failed_event()
end
-- The events written leave the lane before anything else is written: a script that fails keeps
-- what it wrote, and a step that failed after its events' writes would write them again.
local tries_key = step[13]
if written > 0 then
  redis.call('LTRIM', lane, written, -1)
  redis.call('HDEL', tries_key, rows[1])  -- only a lane's head event is ever retried
end
-- The report counters of the events written, even when a write failed part way. They are
-- derived: a key of theirs of another type (another program's) costs the report those counts,
-- said in the reply, not the step.
local counted, counts_error = pcall(write_counts)
if not counted then
  counts_error = type(counts_error) == 'table' and counts_error.err or tostring(counts_error)
else
  counts_error = false
end
if forwarded and redis.call('EXISTS', step[19]) == 0 then
  local now = tonumber(step[11])
  queue_job(step[19], step[15], step[10], step[20], 'forward', step[9], now, now, step[16])
end
if not ok then
  local b = written * WIDTH
  failed = {rows[b + 1], rows[b + 2], type(err) == 'table' and err.err or tostring(err)}
end

local status, tries = '', 0
local next_id, queue, now = step[8], step[10], tonumber(step[11])

-- The lane's next job, due at `at` (queue_job: shared/queue_job.lua).
local function queue_next(at)
  queue_job(owner, step[15], queue, next_id, 'lane', step[9], now, at, step[16])
end

if failed then
  tries = redis.call('HINCRBY', tries_key, failed[1], 1)
  if tries < tonumber(step[12]) then
    local backoffs = step[17]
    queue_next(now + (backoffs[tries] or backoffs[#backoffs]))
    return remember(steps, lane, step_id, {out, 'retry', tries, counts_error})
  end
  redis.call('XADD', step[14], '*', 'id', failed[1], 'kind', failed[2],
    'error', string.sub(failed[3], 1, 2000), 'tries', tries, 'failed_at', now,
    'payload', redis.call('LINDEX', lane, 0) or '')
  redis.call('SET', seen_prefix .. failed[1], 'x', 'EX', window)
  redis.call('HDEL', tries_key, failed[1])
  redis.call('LPOP', lane)
  status = 'dead '
end

local after = next_step(lane, owner, mode == 'handoff', queue_next, now)
return remember(steps, lane, step_id, {out, status .. after, tries, counts_error})
