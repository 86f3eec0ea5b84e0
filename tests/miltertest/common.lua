-- Shared helpers for the miltertest scripts (loaded with dofile(dir .. "/common.lua")).
-- Globals set by tests/test_protocol.py with -D: port, dir, and per-script numbers.

REPLY_NAMES = {}
for name, v in pairs({SMFIR_CONTINUE = SMFIR_CONTINUE, SMFIR_ACCEPT = SMFIR_ACCEPT,
                      SMFIR_REJECT = SMFIR_REJECT, SMFIR_TEMPFAIL = SMFIR_TEMPFAIL,
                      SMFIR_DISCARD = SMFIR_DISCARD, SMFIR_REPLYCODE = SMFIR_REPLYCODE}) do
  REPLY_NAMES[v] = name
end

function reply_name(r)
  return REPLY_NAMES[r] or ("reply " .. tostring(r))
end

-- Fail unless the step returned nil (miltertest's "success").
function ok(err, what)
  if err ~= nil then
    error(what .. " failed: " .. tostring(err), 2)
  end
end

-- Fail unless the last reply on conn is one of the wanted SMFIR_* values.
function expect(conn, what, ...)
  local got = mt.getreply(conn)
  for _, want in ipairs({...}) do
    if got == want then
      return got
    end
  end
  local names = {}
  for _, want in ipairs({...}) do
    table.insert(names, reply_name(want))
  end
  error(string.format("%s: got %s, wanted %s", what, reply_name(got), table.concat(names, " or ")), 2)
end

function open(ip)
  mt.set_timeout(15)
  local conn = mt.connect("inet:" .. port .. "@127.0.0.1", 40, 0.25)
  if conn == nil then
    error("cannot connect to the milter on 127.0.0.1:" .. port)
  end
  return conn
end

-- Headers and a body for a plain SMS mail; eoh/body replies may be skipped (SMFIP_NR_*)
-- so only the end-of-message reply is checked by the callers.
function plain_message(conn, subject, body)
  ok(mt.header(conn, "From", "<sender@client.example>"), "header From")
  ok(mt.header(conn, "Subject", subject), "header Subject")
  ok(mt.header(conn, "Message-ID", "<" .. body:gsub("%W", "") .. "@client.example>"), "header Message-ID")
  ok(mt.header(conn, "Content-Type", "text/plain; charset=us-ascii"), "header Content-Type")
  ok(mt.eoh(conn), "eoh")
  ok(mt.bodystring(conn, body .. "\r\n"), "body")
end
