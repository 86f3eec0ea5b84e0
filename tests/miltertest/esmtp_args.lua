-- RCPT with ESMTP args (NOTIFY=NEVER) and a mixed-case domain: the SMS recipient is deleted
-- at end of message with exactly the address as received (no args, case kept), the mail
-- recipient stays.
-- -D port= dir= n1=
dofile(dir .. "/common.lua")

local conn = open()
ok(mt.conninfo(conn, "client.example", "127.0.0.1"), "conninfo")
ok(mt.mailfrom(conn, "<c4ca423@client.example>", "BODY=8BITMIME", "SIZE=200"), "mailfrom")
local sms = "<" .. n1 .. "@SMS.Example.COM>"
ok(mt.rcptto(conn, sms, "NOTIFY=NEVER", "ORCPT=rfc822;" .. n1 .. "@SMS.Example.COM"), "rcptto sms")
expect(conn, "rcpt sms", SMFIR_CONTINUE)
ok(mt.rcptto(conn, "<someone@relay.example>", "NOTIFY=SUCCESS,FAILURE"), "rcptto mail")
expect(conn, "rcpt mail", SMFIR_CONTINUE)
plain_message(conn, "", "esmtp args " .. n1)
ok(mt.eom(conn), "eom")
expect(conn, "eom", SMFIR_CONTINUE, SMFIR_ACCEPT)
if not mt.eom_check(conn, MT_RCPTDELETE, sms) then
  error("eom: " .. sms .. " was not deleted with exactly the address as received")
end
if mt.eom_check(conn, MT_RCPTDELETE, "<someone@relay.example>") then
  error("eom: deleted the mail recipient")
end
mt.disconnect(conn)
