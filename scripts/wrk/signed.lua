-- wrk script for `tally bench http`: sends pre-signed Tally requests, never one twice.
--
--   wrk -t T -c C -d 10s -s scripts/wrk/signed.lua http://127.0.0.1:PORT -- \
--       POOL TARGET KEY_ID MODE
--
-- wrk's Lua has no HMAC, so `tally bench http` writes the requests beforehand, one file
-- per wrk thread, read as pool.lua says; the REST of a line is the BODY, signed for
-- POST TARGET with KEY_ID and "Content-Type: application/json", no Idempotency-Key (the
-- timestamps stay valid for the ingress's 5-minute skew window). Every line has its own
-- nonce, so its own signature: the ingress accepts a signature once, and a line sent
-- twice would be answered 401. MODE is "single" (a 202 accepts one command) or "batch"
-- (the answer's "accepted" counts the commands).
--
-- At the end the main thread prints one line, "TALLY-RESULT {json}", with the status
-- counts, the accepted commands, wrk's error counts and its latency percentiles (us).

local pool = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "") .. "pool.lua")

setup = pool.setup

function init(args)
   local path, target, key_id = args[1], args[2], args[3]
   batch = args[4] == "batch"
   pool.open(path)
   accepted = 0
   head = "POST " .. target .. " HTTP/1.1\r\n"
      .. "Host: " .. wrk.host .. ":" .. wrk.port .. "\r\n"
      .. "Content-Type: application/json\r\n"
      .. "Tally-Key-Id: " .. key_id .. "\r\n"
      .. "Tally-Timestamp: "
end

function request()
   local timestamp, nonce, signature, body = pool.next()
   if timestamp == nil then
      return spent
   end
   return head .. timestamp
      .. "\r\nTally-Nonce: " .. nonce
      .. "\r\nTally-Signature: " .. signature
      .. "\r\nContent-Length: " .. #body
      .. "\r\n\r\n" .. body
end

function response(status, headers, body)
   pool.count(status)
   if status == 202 or status == 207 then
      if batch then
         accepted = accepted + (tonumber(body:match('"accepted":(%d+)')) or 0)
      elseif status == 202 then
         accepted = accepted + 1
      end
   end
end

function done(summary, latency, requests)
   local codes, sums = pool.totals({ "accepted" })
   local e = summary.errors
   io.write(string.format(
      'TALLY-RESULT {"duration_us":%d,"responses":%d,"sent":%d,"accepted":%d,'
         .. '"threads_out_of_pool":%d,"statuses":{%s},'
         .. '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d},'
         .. '"latency_us":{"p50":%.1f,"p90":%.1f,"p99":%.1f,"max":%.1f,"mean":%.1f}}\n',
      summary.duration, summary.requests, sums.sent, sums.accepted, sums.exhausted,
      codes, e.connect, e.read, e.write, e.timeout, e.status,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean))
end
