-- wrk script for `tally bench http`: sends pre-signed Tally requests, never one twice.
--
--   wrk -t T -c C -d 10s -s scripts/wrk/signed.lua http://127.0.0.1:PORT -- \
--       POOL TARGET KEY_ID MODE
--
-- wrk's Lua has no HMAC, so `tally bench http` writes the requests beforehand, one file
-- per wrk thread (POOL.0, POOL.1, ...): the threads' slices are disjoint, and a thread
-- sends each line of its own file once, in order. A line is
--
--   TIMESTAMP(10 digits) SP NONCE(24 characters) SP SIGNATURE(64 hex) SP BODY LF
--
-- signed for POST TARGET with KEY_ID and "Content-Type: application/json", no
-- Idempotency-Key (the timestamps stay valid for the ingress's 5-minute skew window).
-- Every line has its own nonce, so its own signature: the ingress accepts a signature
-- once, and a line sent twice would be answered 401. wrk calls request() for every
-- request it sends, also after a reconnect, so no line is ever sent twice. A thread
-- whose file runs out stops (and says so in the result line): it never reuses a
-- command_id or a signature. MODE is "single" (a 202 accepts one command) or
-- "batch" (the answer's "accepted" counts the commands).
--
-- At the end the main thread prints one line, "TALLY-RESULT {json}", with the status
-- counts, the accepted commands, wrk's error counts and its latency percentiles (us).

local threads = {}

function setup(thread)
   thread:set("id", #threads)
   table.insert(threads, thread)
end

function init(args)
   local pool, target, key_id = args[1], args[2], args[3]
   batch = args[4] == "batch"
   local f = assert(io.open(pool .. "." .. id, "rb"))
   data = f:read("*a")
   f:close()
   pos = 1
   statuses = {}
   accepted = 0
   sent = 0
   exhausted = 0
   head = "POST " .. target .. " HTTP/1.1\r\n"
      .. "Host: " .. wrk.host .. ":" .. wrk.port .. "\r\n"
      .. "Content-Type: application/json\r\n"
      .. "Tally-Key-Id: " .. key_id .. "\r\n"
      .. "Tally-Timestamp: "
   -- What a thread sends after its file ran out, as it stops: harmless and unsigned.
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
   local body = data:sub(pos + 101, nl - 1)
   pos = nl + 1
   sent = sent + 1
   return head .. timestamp
      .. "\r\nTally-Nonce: " .. nonce
      .. "\r\nTally-Signature: " .. signature
      .. "\r\nContent-Length: " .. #body
      .. "\r\n\r\n" .. body
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
   if status == 202 or status == 207 then
      if batch then
         accepted = accepted + (tonumber(body:match('"accepted":(%d+)')) or 0)
      elseif status == 202 then
         accepted = accepted + 1
      end
   end
end

function done(summary, latency, requests)
   local counts, total_accepted, total_sent, out_of_pool = {}, 0, 0, 0
   for _, thread in ipairs(threads) do
      for status, n in pairs(thread:get("statuses")) do
         counts[status] = (counts[status] or 0) + n
      end
      total_accepted = total_accepted + thread:get("accepted")
      total_sent = total_sent + thread:get("sent")
      out_of_pool = out_of_pool + thread:get("exhausted")
   end
   local codes = {}
   for status, n in pairs(counts) do
      codes[#codes + 1] = string.format('"%d":%d', status, n)
   end
   local e = summary.errors
   io.write(string.format(
      'TALLY-RESULT {"duration_us":%d,"responses":%d,"sent":%d,"accepted":%d,'
         .. '"threads_out_of_pool":%d,"statuses":{%s},'
         .. '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d},'
         .. '"latency_us":{"p50":%.1f,"p90":%.1f,"p99":%.1f,"max":%.1f,"mean":%.1f}}\n',
      summary.duration, summary.requests, total_sent, total_accepted, out_of_pool,
      table.concat(codes, ","), e.connect, e.read, e.write, e.timeout, e.status,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean))
end
