-- wrk script for bench/run: adds the Authorization header, optionally rotates tokens and paths,
-- optionally stops after SG_LIMIT responses, and prints one machine-readable summary line.
--
--   SG_TOKEN        one token, sent as "Authorization: Bearer <token>" on every request
--   SG_TOKENS_FILE  a file with one token per line: rotated request by request (soak)
--   SG_PATHS_FILE   a file with one path per line: rotated request by request (soak)
--   SG_LIMIT        stop after this many responses (wrk runs one thread: -t1)
--   SG_HEADERS_FILE extra headers, one "Name: value" per line, on every request
--   SG_REQUEST_TARGET  the request target sent instead of the URL's path: an absolute URL
--                   ("http://127.0.0.1:8443/v1/..."), when the URL given to wrk is a forward proxy
--
-- Without SG_TOKENS_FILE/SG_PATHS_FILE no `request` function is defined, so wrk sends a
-- pre-built request and Lua costs nothing per request.

local function lines(path)
  local out = {}
  if path == nil or path == "" then return out end
  for line in io.lines(path) do
    if line ~= "" then out[#out + 1] = line end
  end
  return out
end

local request_target = os.getenv("SG_REQUEST_TARGET")
if request_target ~= nil and request_target ~= "" then
  wrk.path = request_target
end

for _, line in ipairs(lines(os.getenv("SG_HEADERS_FILE"))) do
  local name, value = line:match("^([^:]+):%s*(.*)$")
  if name ~= nil then wrk.headers[name] = value end
end

local token = os.getenv("SG_TOKEN")
if token ~= nil and token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end

-- SG_BODY_FILE: every request is a POST of this file's bytes as application/json (GraphQL).
local body_file = os.getenv("SG_BODY_FILE")
if body_file ~= nil and body_file ~= "" then
  local handle = io.open(body_file, "rb")
  wrk.method = "POST"
  wrk.body = handle:read("*a")
  handle:close()
  wrk.headers["Content-Type"] = "application/json"
end

local tokens = lines(os.getenv("SG_TOKENS_FILE"))
local paths = lines(os.getenv("SG_PATHS_FILE"))
if #tokens > 0 or #paths > 0 then
  local i = 0
  request = function()
    i = i + 1
    local headers = {}
    if #tokens > 0 then
      headers["Authorization"] = "Bearer " .. tokens[(i % #tokens) + 1]
    elseif token ~= nil and token ~= "" then
      headers["Authorization"] = "Bearer " .. token
    end
    local path = wrk.path
    if #paths > 0 then path = paths[(i % #paths) + 1] end
    return wrk.format("GET", path, headers)
  end
end

local limit = tonumber(os.getenv("SG_LIMIT") or "")
if limit ~= nil and limit > 0 then
  local seen = 0
  response = function(status, headers, body)
    seen = seen + 1
    if seen >= limit then wrk.thread:stop() end
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"errors_connect":%d,"errors_read":%d,' ..
    '"errors_write":%d,"errors_timeout":%d,"non2xx":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
