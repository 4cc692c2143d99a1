-- wrk script for the read benchmark (issue 16): pre-signed GETs, never one twice.
--
--   wrk -t T -c C -d 10s -s scripts/wrk/signed_get.lua http://127.0.0.1:PORT -- POOL KEY_ID
--
-- Like signed.lua, one file per wrk thread (POOL.0, POOL.1, ...), each line sent once:
--
--   TIMESTAMP(10 digits) SP NONCE(24 characters) SP SIGNATURE(64 hex) SP TARGET LF
--
-- signed for GET TARGET with KEY_ID, no body, no Content-Type. A thread whose file
-- runs out stops. The main thread prints "TALLY-RESULT {json}" with the status counts
-- and wrk's latency percentiles (us).

local threads = {}

function setup(thread)
   thread:set("id", #threads)
   table.insert(threads, thread)
end

function init(args)
   local pool, key_id = args[1], args[2]
   local f = assert(io.open(pool .. "." .. id, "rb"))
   data = f:read("*a")
   f:close()
   pos = 1
   statuses = {}
   sent = 0
   exhausted = 0
   tail = " HTTP/1.1\r\nHost: " .. wrk.host .. ":" .. wrk.port .. "\r\n"
      .. "Tally-Key-Id: " .. key_id .. "\r\nTally-Timestamp: "
   spent = "GET /livez HTTP/1.1\r\nHost: " .. wrk.host .. ":" .. wrk.port .. "\r\n\r\n"
end

function request()
   local nl = data:find("\n", pos, true)
   if nl == nil then
      exhausted = 1
      wrk.thread:stop()
      return spent
   end
   local timestamp = data:sub(pos, pos + 9)
   local nonce = data:sub(pos + 11, pos + 34)
   local signature = data:sub(pos + 36, pos + 99)
   local target = data:sub(pos + 101, nl - 1)
   pos = nl + 1
   sent = sent + 1
   return "GET " .. target .. tail .. timestamp
      .. "\r\nTally-Nonce: " .. nonce
      .. "\r\nTally-Signature: " .. signature .. "\r\n\r\n"
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
   local counts, total_sent, out_of_pool = {}, 0, 0
   for _, thread in ipairs(threads) do
      for status, n in pairs(thread:get("statuses")) do
         counts[status] = (counts[status] or 0) + n
      end
      total_sent = total_sent + thread:get("sent")
      out_of_pool = out_of_pool + thread:get("exhausted")
   end
   local codes = {}
   for status, n in pairs(counts) do
      codes[#codes + 1] = string.format('"%d":%d', status, n)
   end
   io.write(string.format(
      'TALLY-RESULT {"duration_us":%d,"responses":%d,"sent":%d,"threads_out_of_pool":%d,'
         .. '"statuses":{%s},"latency_us":{"p50":%.1f,"p99":%.1f,"max":%.1f}}\n',
      summary.duration, summary.requests, total_sent, out_of_pool, table.concat(codes, ","),
      latency:percentile(50), latency:percentile(99), latency.max))
end
