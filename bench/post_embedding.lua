-- wrk script: POST /v1/embeddings with one ~12-word sentence per request.
--
--   wrk -t2 -c64 -d10s -s bench/post_embedding.lua http://127.0.0.1:PORT/v1/embeddings -- BODIES
--
-- BODIES is a file with one JSON request body per line (bench/http_load.py writes it). Each
-- thread pre-formats every request once and cycles through them from its own offset, so the
-- per-request cost in wrk is a table lookup. done() prints one machine-parsable line:
--
--   TIDEGATE_WRK {"requests":..,"duration_us":..,"p50_us":..,"p99_us":..,"non2xx":..,...}
--
-- "non2xx" is wrk's own status-error count (responses with status >= 400), the number behind
-- its "Non-2xx or 3xx responses" line; counting in response() would make wrk hand every
-- response to Lua and slow the client down.

local next_thread_index = 0

function setup(thread)
   thread:set("thread_index", next_thread_index)
   next_thread_index = next_thread_index + 1
end

local prepared = {}
local position = 1

function init(args)
   local path = args[1]
   if path == nil then
      error("usage: wrk -s post_embedding.lua URL -- BODIES_FILE")
   end
   for line in io.lines(path) do
      if #line > 0 then
         local headers = { ["Content-Type"] = "application/json" }
         prepared[#prepared + 1] = wrk.format("POST", nil, headers, line)
      end
   end
   if #prepared == 0 then
      error("no request bodies in " .. path)
   end
   -- Threads start at different sentences so concurrent requests differ.
   position = ((thread_index or 0) * 97) % #prepared + 1
end

function request()
   local r = prepared[position]
   position = position % #prepared + 1
   return r
end

function done(summary, latency, requests)
   local errors = summary.errors
   io.write(string.format(
      'TIDEGATE_WRK {"requests":%d,"duration_us":%d,"bytes":%d,'
         .. '"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,"mean_us":%.1f,"max_us":%.1f,'
         .. '"non2xx":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,'
         .. '"timeouts":%d}\n',
      summary.requests, summary.duration, summary.bytes,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.mean, latency.max,
      errors.status, errors.connect, errors.read, errors.write, errors.timeout
   ))
end
