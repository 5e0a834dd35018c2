-- The built-in outputs of a batch of processed events, exactly once in effect.
--
-- ARGV[1] dedupe window (s)    ARGV[2] stream MAXLEN       ARGV[3] history cap
-- ARGV[4] referrals stream     ARGV[5] report ad titles    ARGV[6] report retention (s)
-- ARGV[7..10] key prefixes: seen, event stream, attribution, report day
-- ARGV[11] the events, one MessagePack array of arrays (one argument instead of a dozen per
--          event: packing arguments was half a worker's time):
--   {id, kind, channel, page id, sender, timestamp ms, event JSON, touch, touch JSON, day,
--    ad title}
--   where touch is a positional array (shared/attribution.py POSITIONS) or false.
-- ARGV[12] the job's try (arq's job_try; 0 when unknown)
-- ARGV[13..] optional: the arq job these events came from, finished here once every write is
--          made, as arq finishes it: its in-progress, retry and job keys, then the queue, the
--          abort set and the job id. Outputs and the job's end are one atomic step, and the
--          worker saves arq's separate round trip (each waits behind every queued Lua call).
--
-- Done marks. A job that runs again (after a crash, a retry, or a write that failed part way)
-- must skip the events an earlier run wrote: those carry 'd' (done) in their seen key, and are
-- skipped. A job's first run, ended by this call, needs neither: no run wrote before it (its try
-- counter, which every claim increments, still says 1, so no other worker has claimed it) and
-- none can run after it (the job is gone). That run, the usual case, reads and writes no marks
-- (a quarter of this script's time); every other run reads them and writes them, and a write
-- failing part way marks the events written before it.
-- Returns one code per event: 0 skipped, 1 written, 2 written with a touch for a new user,
-- 3 written with a touch for a returning user.
local window, maxlen, cap, referrals = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local ad_titles, retention = ARGV[5], tonumber(ARGV[6])
local seen_prefix, stream_prefix, attr_prefix, day_prefix = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local ends = ARGV[13] ~= nil
local marks = not (ends and ARGV[12] == '1' and redis.call('GET', ARGV[14]) == '1')

-- Positions in a stored touch (1-based): shared/attribution.py POSITIONS.
local T, SOURCE, REF, AD = 1, 3, 5, 6

-- Insert a touch into the user's record {count, first, history}: history latest first, capped;
-- the earliest touch ever seen survives as `first` once it falls out of the history.
local function add_touch(key, touch)
  local stored = redis.call('GET', key)
  local record = stored and cmsgpack.unpack(stored) or {0, false, {}}
  local history = record[3]
  local pos = #history + 1
  for j = 1, #history do
    if touch[T] > history[j][T] then
      pos = j
      break
    end
  end
  table.insert(history, pos, touch)
  if #history > cap then
    local dropped = table.remove(history)
    if not record[2] or record[2][T] > dropped[T] then
      record[2] = dropped
    end
  end
  record[1] = record[1] + 1
  redis.call('SET', key, cmsgpack.pack(record))
  return record[1], history[1]
end

-- A touch counted in its day's report hash: `new|source|ADS`, `ret|ref|<ref>`, `new|ad|<ad id>`.
-- Counts are summed over the batch and written once per field (a campaign's touches share a
-- handful of fields); a day's hash expires `retention` seconds after the day ends.
local counts, expiry, titles = {}, {}, {}

local function count(day_key, field)
  local fields = counts[day_key]
  if not fields then
    fields = {}
    counts[day_key] = fields
  end
  fields[field] = (fields[field] or 0) + 1
end

local function count_touch(day_key, touch, returning, title)
  local side = returning and 'ret|' or 'new|'
  count(day_key, side .. 'source|' .. (touch[SOURCE] or ''))
  if touch[REF] then
    count(day_key, side .. 'ref|' .. touch[REF])
  end
  if touch[AD] then
    count(day_key, side .. 'ad|' .. touch[AD])
    if title then
      titles[touch[AD]] = title
    end
  end
  expiry[day_key] = math.floor(touch[T] / 86400000) * 86400 + 86400 + retention
end

local function null(value)
  return value or cjson.null
end

-- Where marks are kept, each event is marked done as soon as its writes are made. The mark
-- overwrites the one-letter state ingest set ('q', or 'x' for a replayed dead event) in place and
-- keeps its dedupe window; only a state gone missing is set anew with the window.
local function mark(seen, state)
  if state then
    redis.call('SETRANGE', seen, 0, 'd')
  else
    redis.call('SET', seen, 'd', 'EX', window)
  end
end

local out, events, written = {}, cmsgpack.unpack(ARGV[11]), 0
local function write_all()
  for n, e in ipairs(events) do
    local id, kind, sender, touch = e[1], e[2], e[5], e[8]
    local seen = seen_prefix .. id
    local state = marks and redis.call('GET', seen)
    if state == 'd' then
      out[n] = 0
    else
      redis.call('XADD', stream_prefix .. kind, 'MAXLEN', '~', maxlen, '*',
        'id', id, 'kind', kind, 'channel', e[3], 'page_id', e[4], 'sender', sender,
        'timestamp', e[6], 'event', e[7])
      out[n] = 1
      if touch then
        local count, last = add_touch(attr_prefix .. sender, touch)
        out[n] = count > 1 and 3 or 2
        count_touch(day_prefix .. e[10], touch, count > 1, e[11])
        local vars = cjson.encode({
          _fbRefSource = null(last[SOURCE]), _fbRefParam = null(last[REF]),
          _fbRefAdId = null(last[AD]),
        })
        redis.call('XADD', referrals, 'MAXLEN', '~', maxlen, '*',
          'user', sender, 'returning', count > 1 and '1' or '0', 'touches', count,
          'touch', e[9], 'vars', vars)
      end
      if marks then
        mark(seen, state)
      end
    end
    written = n
  end
end

-- The report counters of the events written are added even when a write fails part way.
local ok, err = pcall(write_all)
if not ok and not marks then
  -- The job runs again: the events written before the failure must be skipped then.
  for n = 1, written do
    if out[n] > 0 then
      local seen = seen_prefix .. events[n][1]
      mark(seen, redis.call('GET', seen))
    end
  end
end
for day_key, fields in pairs(counts) do
  for field, by in pairs(fields) do
    redis.call('HINCRBY', day_key, field, by)
  end
  redis.call('EXPIREAT', day_key, expiry[day_key])
end
for ad, title in pairs(titles) do
  redis.call('HSET', ad_titles, ad, title)
end
if not ok then
  error(err)
end
if ends then
  redis.call('DEL', ARGV[13], ARGV[14], ARGV[15])
  redis.call('ZREM', ARGV[16], ARGV[18])
  redis.call('ZREM', ARGV[17], ARGV[18])
end
return out
