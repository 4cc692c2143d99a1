-- What signed.lua and signed_get.lua share: the threads' pre-signed pools, read line by
-- line and never a line twice, and the totals over the threads at the end.
--
-- A script loads it with dofile from its own directory (wrk runs the script once in
-- its main Lua state and once in each thread's, so each state has its own copy):
--
--   local pool = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "") .. "pool.lua")
--
-- One file per wrk thread (POOL.0, POOL.1, ...): the threads' slices are disjoint, and a
-- thread sends each line of its own file once, in order. A line is
--
--   TIMESTAMP(10 digits) SP NONCE(24 characters) SP SIGNATURE(64 hex) SP REST LF
--
-- where REST is the script's own (a body, or a request target). wrk calls request()
-- for every request it sends, also after a reconnect, so no line is ever sent twice. A
-- thread whose file runs out stops (and says so in the totals): it never reuses a
-- command_id or a signature.
--
-- The thread's counters are globals (wrk's thread:get reads globals): statuses (status
-- -> answers), sent (lines sent), exhausted (1 once the file ran out).

local pool = {}
local threads = {}

-- wrk's setup(thread), in the main state: number the threads 0, 1, ...
function pool.setup(thread)
   thread:set("id", #threads)
   table.insert(threads, thread)
end

-- In init(args): read this thread's file and zero its counters.
function pool.open(path)
   local f = assert(io.open(path .. "." .. id, "rb"))
   data = f:read("*a")
   f:close()
   pos = 1
   statuses = {}
   sent = 0
   exhausted = 0
   -- What a thread sends after its file ran out, as it stops: harmless and unsigned.
   spent = "GET /livez HTTP/1.1\r\nHost: " .. wrk.host .. ":" .. wrk.port .. "\r\n\r\n"
end

-- In request(): the next line's timestamp, nonce, signature and rest; nil (and the
-- thread stopping) once the file ran out: request() then returns `spent`.
function pool.next()
   local nl = data:find("\n", pos, true)
   if nl == nil then
      exhausted = 1
      wrk.thread:stop()
      return nil
   end
   local timestamp = data:sub(pos, pos + 9)
   local nonce = data:sub(pos + 11, pos + 34)
   local signature = data:sub(pos + 36, pos + 99)
   local rest = data:sub(pos + 101, nl - 1)
   pos = nl + 1
   sent = sent + 1
   return timestamp, nonce, signature, rest
end

-- In response(status, ...): count the answer by its status.
function pool.count(status)
   statuses[status] = (statuses[status] or 0) + 1
end

-- In done(), in the main state: the status counts as JSON members ('"202":10,...'), and
-- the sums over the threads of sent, exhausted and each name of `more`.
function pool.totals(more)
   local counts, sums = {}, { sent = 0, exhausted = 0 }
   for _, name in ipairs(more or {}) do
      sums[name] = 0
   end
   for _, thread in ipairs(threads) do
      for status, n in pairs(thread:get("statuses")) do
         counts[status] = (counts[status] or 0) + n
      end
      for name, total in pairs(sums) do
         sums[name] = total + thread:get(name)
      end
   end
   local codes = {}
   for status, n in pairs(counts) do
      codes[#codes + 1] = string.format('"%d":%d', status, n)
   end
   return table.concat(codes, ","), sums
end

return pool
