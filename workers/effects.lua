-- The built-in outputs of a batch of processed events, exactly once in effect.
--
-- ARGV[1] dedupe window (s)   ARGV[2] stream MAXLEN   ARGV[3] history cap
-- ARGV[4] referrals stream key   ARGV[5] report ad-titles hash   ARGV[6] report retention (s)
-- then 13 values per event: seen key, stream key, id, kind, channel, page id, sender,
-- timestamp (ms), event JSON, attribution key ('' when no touch), touch (MessagePack), touch JSON,
-- report key of the touch's UTC day.
--
-- An event whose seen key already says 'd' (done) is skipped, so a job that runs again after a
-- crash writes nothing twice. Returns one code per event: 0 skipped, 1 written,
-- 2 written with a touch for a new user, 3 written with a touch for a returning user.
local window, maxlen, cap, referrals = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local ad_titles, retention = ARGV[5], tonumber(ARGV[6])

-- Insert a touch into the user's history (latest timestamp first, capped at `cap`). The
-- earliest touch ever seen survives in field 'f' once it falls out of the history.
local function add_touch(key, blob)
  local touch = cmsgpack.unpack(blob)
  local packed = redis.call('HGET', key, 'h')
  local history = packed and cmsgpack.unpack(packed) or {}
  local pos = #history + 1
  for j = 1, #history do
    if touch.t > history[j].t then
      pos = j
      break
    end
  end
  table.insert(history, pos, touch)
  if #history > cap then
    local dropped = table.remove(history)
    local first = redis.call('HGET', key, 'f')
    if not first or cmsgpack.unpack(first).t > dropped.t then
      redis.call('HSET', key, 'f', cmsgpack.pack(dropped))
    end
  end
  redis.call('HSET', key, 'h', cmsgpack.pack(history))
  local count = redis.call('HINCRBY', key, 'n', 1)
  return count, history[1], touch
end

-- Count a touch in its day's report hash: `new|source|ADS`, `ret|ref|<ref>`, `new|ad|<ad id>`.
-- A day's hash expires `retention` seconds after the day ends.
local function count_touch(day_key, touch, returning)
  local side = returning and 'ret|' or 'new|'
  redis.call('HINCRBY', day_key, side .. 'source|' .. (touch.s or ''), 1)
  if touch.r then
    redis.call('HINCRBY', day_key, side .. 'ref|' .. touch.r, 1)
  end
  if touch.a then
    redis.call('HINCRBY', day_key, side .. 'ad|' .. touch.a, 1)
    local title = type(touch.c) == 'table' and touch.c.ad_title
    if type(title) == 'string' and title ~= '' then
      redis.call('HSET', ad_titles, touch.a, title)
    end
  end
  redis.call('EXPIREAT', day_key, math.floor(touch.t / 86400000) * 86400 + 86400 + retention)
end

local out = {}
for i = 7, #ARGV, 13 do
  local seen = ARGV[i]
  if redis.call('GET', seen) == 'd' then
    out[#out + 1] = 0
  else
    local sender, attr = ARGV[i + 6], ARGV[i + 9]
    redis.call('XADD', ARGV[i + 1], 'MAXLEN', '~', maxlen, '*',
      'id', ARGV[i + 2], 'kind', ARGV[i + 3], 'channel', ARGV[i + 4], 'page_id', ARGV[i + 5],
      'sender', sender, 'timestamp', ARGV[i + 7], 'event', ARGV[i + 8])
    local code = 1
    if attr ~= '' then
      local count, last, touch = add_touch(attr, ARGV[i + 10])
      code = count > 1 and 3 or 2
      count_touch(ARGV[i + 12], touch, count > 1)
      local vars = cjson.encode({
        _fbRefSource = last.s or cjson.null,
        _fbRefParam = last.r or cjson.null,
        _fbRefAdId = last.a or cjson.null,
      })
      redis.call('XADD', referrals, 'MAXLEN', '~', maxlen, '*',
        'user', sender, 'returning', count > 1 and '1' or '0', 'touches', count,
        'touch', ARGV[i + 11], 'vars', vars)
    end
    redis.call('SET', seen, 'd', 'EX', window)
    out[#out + 1] = code
  end
end
return out
