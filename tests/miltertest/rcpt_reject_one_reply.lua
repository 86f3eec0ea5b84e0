-- A rejected RCPT gets exactly one reply: the next RCPT on the same connection must get
-- its own answer (a spare second reply would be read as the answer to it).
-- -D port= dir= n1= n2=
dofile(dir .. "/common.lua")

local conn = open()
ok(mt.conninfo(conn, "client.example", "127.0.0.1"), "conninfo")
ok(mt.mailfrom(conn, "<c4ca423@client.example>"), "mailfrom")
ok(mt.rcptto(conn, "<+41791234567@sms.example.com>"), "rcptto plus")
expect(conn, "rcpt +41...", SMFIR_REPLYCODE)
ok(mt.rcptto(conn, "<" .. n1 .. "@sms.example.com>"), "rcptto good")
expect(conn, "rcpt after a refusal", SMFIR_CONTINUE)
ok(mt.rcptto(conn, "<hello@sms.example.com>"), "rcptto not-sms")
expect(conn, "rcpt hello@", SMFIR_REPLYCODE)
plain_message(conn, "", "one reply " .. n1)
ok(mt.eom(conn), "eom")
expect(conn, "eom", SMFIR_CONTINUE, SMFIR_ACCEPT, SMFIR_DISCARD)

-- and a whole new transaction on the same connection still works
ok(mt.mailfrom(conn, "<c4ca423@client.example>"), "mailfrom 2")
ok(mt.rcptto(conn, "<" .. n2 .. "@sms.example.com>"), "rcptto 2")
expect(conn, "rcpt 2", SMFIR_CONTINUE)
plain_message(conn, "", "second transaction " .. n2)
ok(mt.eom(conn), "eom 2")
expect(conn, "eom 2", SMFIR_CONTINUE, SMFIR_ACCEPT, SMFIR_DISCARD)
mt.disconnect(conn)
