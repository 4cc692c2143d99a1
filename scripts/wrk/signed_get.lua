-- wrk script for the read benchmark (issue 16): pre-signed GETs, never one twice.
--
--   wrk -t T -c C -d 10s -s scripts/wrk/signed_get.lua http://127.0.0.1:PORT -- POOL KEY_ID
--
-- Like signed.lua, one file per wrk thread, read as pool.lua says; the REST of a line
-- is the TARGET, signed for GET TARGET with KEY_ID, no body, no Content-Type. The main
-- thread prints "TALLY-RESULT {json}" with the status counts and wrk's latency
-- percentiles (us).

local pool = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "") .. "pool.lua")

setup = pool.setup

function init(args)
   local path, key_id = args[1], args[2]
   pool.open(path)
   tail = " HTTP/1.1\r\nHost: " .. wrk.host .. ":" .. wrk.port .. "\r\n"
      .. "Tally-Key-Id: " .. key_id .. "\r\nTally-Timestamp: "
end

function request()
   local timestamp, nonce, signature, target = pool.next()
   if timestamp == nil then
      return spent
   end
   return "GET " .. target .. tail .. timestamp
      .. "\r\nTally-Nonce: " .. nonce
      .. "\r\nTally-Signature: " .. signature .. "\r\n\r\n"
end

function response(status, headers, body)
   pool.count(status)
end

function done(summary, latency, requests)
   local codes, sums = pool.totals()
   io.write(string.format(
      'TALLY-RESULT {"duration_us":%d,"responses":%d,"sent":%d,"threads_out_of_pool":%d,'
         .. '"statuses":{%s},"latency_us":{"p50":%.1f,"p99":%.1f,"max":%.1f}}\n',
      summary.duration, summary.requests, sums.sent, sums.exhausted, codes,
      latency:percentile(50), latency:percentile(99), latency.max))
end
