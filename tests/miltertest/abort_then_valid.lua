-- A client aborts mid-message (after part of the body); a new valid message on the same
-- milter connection must be judged on its own (no state leaks from the aborted one).
-- -D port= dir= n1= (number for the aborted message) n2= (number for the valid one)
dofile(dir .. "/common.lua")

local conn = open()
ok(mt.conninfo(conn, "client.example", "127.0.0.1"), "conninfo")

ok(mt.mailfrom(conn, "<c4ca423@client.example>"), "mailfrom 1")
ok(mt.rcptto(conn, "<" .. n1 .. "@sms.example.com>"), "rcptto 1")
expect(conn, "rcpt 1", SMFIR_CONTINUE)
ok(mt.header(conn, "Subject", "Originator=Aborted"), "header 1")
ok(mt.eoh(conn), "eoh 1")
ok(mt.bodystring(conn, "this message is aborted half way\r\n"), "body 1")
ok(mt.abort(conn), "abort")

ok(mt.mailfrom(conn, "<c4ca423@client.example>"), "mailfrom 2")
ok(mt.rcptto(conn, "<" .. n2 .. "@sms.example.com>"), "rcptto 2")
expect(conn, "rcpt 2", SMFIR_CONTINUE)
ok(mt.rcptto(conn, "<someone@relay.example>"), "rcptto 2b")
expect(conn, "rcpt 2b", SMFIR_CONTINUE)
plain_message(conn, "", "after abort " .. n2)
ok(mt.eom(conn), "eom 2")
expect(conn, "eom 2", SMFIR_CONTINUE, SMFIR_ACCEPT)
if not mt.eom_check(conn, MT_RCPTDELETE, "<" .. n2 .. "@sms.example.com>") then
  error("eom 2: the SMS recipient was not deleted")
end
if mt.eom_check(conn, MT_RCPTDELETE, "<" .. n1 .. "@sms.example.com>") then
  error("eom 2: deleted a recipient of the aborted message")
end
if mt.eom_check(conn, MT_RCPTDELETE, "<someone@relay.example>") then
  error("eom 2: deleted the mail recipient")
end
mt.disconnect(conn)
