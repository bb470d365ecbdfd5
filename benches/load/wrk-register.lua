-- wrk script for benches/load/run.sh: POSTs a file registration with a fresh fileName on every
-- request (so no registration is a duplicate) to the URL wrk is given,
-- http://HOST/v1/sessions/SESSION/files.
-- Arguments after `--`: the bearer credential (empty: no Authorization header, for the
-- baseline server, which checks none).
--   wrk -t2 -c64 -d12s --latency -s wrk-register.lua URL -- KEY

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("thread_id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  counter = 0
  headers = { ["Content-Type"] = "application/json" }
  if args[1] and args[1] ~= "" then
    headers["Authorization"] = "Bearer " .. args[1]
  end
end

function request()
  counter = counter + 1
  local body = string.format(
    '{"fileName":"wrk-%d-%d.bin","sizeBytes":1048576,"contentType":"application/octet-stream"}',
    thread_id, counter)
  return wrk.format("POST", nil, headers, body)
end

-- Counts answers other than 201 per thread; `done` prints the total for run.sh to check.
function response(status, headers, body)
  if status ~= 201 then
    bad = (bad or 0) + 1
  end
end

function done(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do
    total = total + (t:get("bad") or 0)
  end
  io.write(string.format("WRK_NOT_201=%d\n", total))
  io.write(string.format("WRK_REQ_PER_SEC=%.1f\n", summary.requests / (summary.duration / 1e6)))
  io.write(string.format("WRK_P50_MS=%.3f\n", latency:percentile(50) / 1000))
  io.write(string.format("WRK_P99_MS=%.3f\n", latency:percentile(99) / 1000))
end
