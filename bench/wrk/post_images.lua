-- wrk script: POST request bodies cycling through every file listed in the IMAGE_LIST file (one path per line),
-- so requests differ and their images exit at different stages. The bodies are raw PNGs (Content-Type image/png)
-- or, with CONTENT_TYPE set (e.g. a multipart type with its boundary), whatever that type says. At the end,
-- prints one JSON line with the figures the bench scripts read.
local bodies = {}
local counter = 0
local content_type = os.getenv("CONTENT_TYPE") or "image/png"
-- EXTRA_HEADER "Name: value": one more request header, e.g. Triton's Inference-Header-Content-Length.
local headers = {["Content-Type"] = content_type}
local extra = os.getenv("EXTRA_HEADER")
if extra and extra ~= "" then
  local name, value = extra:match("^([^:]+):%s*(.*)$")
  headers[name] = value
end

function init(args)
  for path in io.lines(os.getenv("IMAGE_LIST")) do
    local f = assert(io.open(path, "rb"))
    bodies[#bodies + 1] = f:read("*a")
    f:close()
  end
  counter = math.random(#bodies)
end

function request()
  counter = counter % #bodies + 1
  return wrk.format("POST", nil, headers, bodies[counter])
end

function done(summary, latency, requests)
  local errors = summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout
  local e = summary.errors
  io.write(string.format('{"requests": %d, "duration_s": %.3f, "errors": %d, "p50_ms": %.3f, "p99_ms": %.3f, '
    .. '"error_kinds": {"status": %d, "connect": %d, "read": %d, "write": %d, "timeout": %d}}\n',
    summary.requests, summary.duration / 1e6, errors, latency:percentile(50) / 1e3, latency:percentile(99) / 1e3,
    e.status, e.connect, e.read, e.write, e.timeout))
end
