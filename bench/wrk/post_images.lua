-- wrk script: POST one image per request (raw body, image/png), cycling through every file listed in the
-- IMAGE_LIST file (one path per line), so requests differ and exit at different stages. At the end, prints one
-- JSON line with the figures bench/serve_schedulers.py reads.
local bodies = {}
local counter = 0

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
  return wrk.format("POST", nil, {["Content-Type"] = "image/png"}, bodies[counter])
end

function done(summary, latency, requests)
  local errors = summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout
  io.write(string.format('{"requests": %d, "duration_s": %.3f, "errors": %d, "p50_ms": %.3f, "p99_ms": %.3f}\n',
    summary.requests, summary.duration / 1e6, errors, latency:percentile(50) / 1e3, latency:percentile(99) / 1e3))
end
