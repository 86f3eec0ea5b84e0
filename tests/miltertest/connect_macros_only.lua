-- Macros arrive only at connect ({client_addr} etc.) and the queue id `i` only at RCPT,
-- as Postfix does; later macro packets replace earlier ones, so the milter must keep what
-- it needs per connection. net@client.example is bound to 192.0.2.0/24.
-- -D port= dir= n1= n2=
dofile(dir .. "/common.lua")

-- inside the allowed network: accepted
local conn = open()
ok(mt.macro(conn, SMFIC_CONNECT, "j", "mx.bed.example", "{daemon_name}", "mx.bed.example",
            "{client_addr}", "192.0.2.10", "{client_name}", "unknown", "v", "Postfix 3.7.11"), "macro connect")
ok(mt.conninfo(conn, "unknown", "192.0.2.10"), "conninfo")
ok(mt.mailfrom(conn, "<net@client.example>"), "mailfrom")
ok(mt.macro(conn, SMFIC_RCPT, "i", "4ABCDE12345", "{rcpt_addr}", n1 .. "@sms.example.com"), "macro rcpt")
ok(mt.rcptto(conn, "<" .. n1 .. "@sms.example.com>"), "rcptto")
expect(conn, "rcpt from 192.0.2.10", SMFIR_CONTINUE)
plain_message(conn, "", "macros at connect " .. n1)
ok(mt.eom(conn), "eom")
expect(conn, "eom", SMFIR_CONTINUE, SMFIR_ACCEPT, SMFIR_DISCARD)
mt.disconnect(conn)

-- outside: refused at RCPT with a custom 5.7.1 reply
conn = open()
ok(mt.macro(conn, SMFIC_CONNECT, "j", "mx.bed.example", "{client_addr}", "127.0.0.1"), "macro connect 2")
ok(mt.conninfo(conn, "localhost", "127.0.0.1"), "conninfo 2")
ok(mt.mailfrom(conn, "<net@client.example>"), "mailfrom 2")
ok(mt.macro(conn, SMFIC_RCPT, "i", "4ABCDE12346"), "macro rcpt 2")
ok(mt.rcptto(conn, "<" .. n2 .. "@sms.example.com>"), "rcptto 2")
expect(conn, "rcpt from 127.0.0.1", SMFIR_REPLYCODE, SMFIR_REJECT)
mt.disconnect(conn)
