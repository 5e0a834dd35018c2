-- Replays a pool of pre-signed requests (raw HTTP/1.1, separated by NUL bytes).
--
--   wrk -t1 -cN -dT --latency -s bench/wrk.lua URL POOL MODE
--
-- MODE "once": send each request once; when every one is answered print DONE (the benchmark then
-- stops wrk with SIGINT, so the run lasts as long as the pool). Connections that free up after
-- the last request send `GET /healthz` fillers, so no request is cut off in flight.
-- MODE "wrap": cycle through the pool until the duration ends (only for the ceiling, which
-- neither checks nor remembers ids).
-- `done` prints one line `RESULT {json}`.

threads = {}
sent, acked, failed, fillers = 0, 0, 0, 0

local reqs, n, i = {}, 0, 0
local mode = "once"
local verified = false
local finished = false
local filler = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  mode = args[2] or "once"
  local f = assert(io.open(args[1], "rb"))
  local data = f:read("*a")
  f:close()
  local pos = 1
  while true do
    local e = string.find(data, "\0", pos, true)
    if not e then break end
    n = n + 1
    reqs[n] = string.sub(data, pos, e - 1)
    pos = e + 1
  end
  io.write("READY ", n, "\n")
  io.stdout:flush()
end

function request()
  if not verified then
    -- wrk calls request() once to check the script before any connection opens: not sent.
    verified = true
    return reqs[1]
  end
  if i < n then
    i = i + 1
    sent = sent + 1
    return reqs[i]
  end
  if mode == "wrap" then
    i = 1
    sent = sent + 1
    return reqs[1]
  end
  return filler
end

function response(status, headers, body)
  if body == "EVENT_RECEIVED" then
    acked = acked + 1
  elseif status == 200 then
    fillers = fillers + 1
    return
  else
    failed = failed + 1
  end
  if mode == "once" and not finished and acked + failed >= n then
    finished = true
    io.write("DONE\n")
    io.stdout:flush()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local t_sent, t_acked, t_failed, t_fillers = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    t_sent = t_sent + t:get("sent")
    t_acked = t_acked + t:get("acked")
    t_failed = t_failed + t:get("failed")
    t_fillers = t_fillers + t:get("fillers")
  end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"duration_us":%d,"responses":%d,"sent":%d,"acked":%d,"failed":%d,"fillers":%d,' ..
    '"socket_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"mean_us":%.1f}\n',
    summary.duration, summary.requests, t_sent, t_acked, t_failed, t_fillers,
    e.connect + e.read + e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
  io.stdout:flush()
end
