-- An end-of-message refusal (HTML) is exactly one SMFIR_REPLYCODE; the next transaction on
-- the same connection gets its own replies.
-- -D port= dir= n1= n2=
dofile(dir .. "/common.lua")

local conn = open()
ok(mt.conninfo(conn, "client.example", "127.0.0.1"), "conninfo")
ok(mt.mailfrom(conn, "<c4ca423@client.example>"), "mailfrom")
ok(mt.rcptto(conn, "<" .. n1 .. "@sms.example.com>"), "rcptto")
expect(conn, "rcpt", SMFIR_CONTINUE)
ok(mt.header(conn, "Subject", ""), "header Subject")
ok(mt.header(conn, "Content-Type", "text/html; charset=us-ascii"), "header Content-Type")
ok(mt.eoh(conn), "eoh")
ok(mt.bodystring(conn, "<html><body>no</body></html>\r\n"), "body")
ok(mt.eom(conn), "eom")
expect(conn, "eom html", SMFIR_REPLYCODE)
-- (the code itself is checked through Postfix in test_inline.py: miltertest 1.4's
-- MT_SMTPREPLY check does not see a reply given as the EOM answer)
ok(mt.abort(conn), "abort after reject")  -- Postfix sends ABORT after a rejected message

ok(mt.mailfrom(conn, "<c4ca423@client.example>"), "mailfrom 2")
ok(mt.rcptto(conn, "<" .. n2 .. "@sms.example.com>"), "rcptto 2")
expect(conn, "rcpt 2", SMFIR_CONTINUE)
plain_message(conn, "", "after html " .. n2)
ok(mt.eom(conn), "eom 2")
expect(conn, "eom 2", SMFIR_CONTINUE, SMFIR_ACCEPT, SMFIR_DISCARD)
mt.disconnect(conn)
