-- Bytes that are not UTF-8 in the HELO name, the envelope and header names and
-- values must not break the session: the message is filtered and accepted.
-- Globals: socket, testdir (see lib.lua).
dofile(testdir .. "/lib.lua")

main(function()
  local conn = open_conn()
  -- The MTA's macros still carry the client address when the host name cannot be decoded.
  mt.macro(conn, SMFIC_CONNECT, "{client_addr}", "198.51.100.77", "{client_name}", "h\233te.example.org")
  step(conn, "conninfo", SMFIR_CONTINUE, mt.conninfo, "h\233te.example.org", "198.51.100.77")
  step(conn, "helo", SMFIR_CONTINUE, mt.helo, "h\233llo\255")
  mt.macro(conn, SMFIC_MAIL, "i", "EIGHTBIT1")
  step(conn, "mailfrom", SMFIR_CONTINUE, mt.mailfrom, "<j\252rgen@example.com>")
  step(conn, "rcptto", SMFIR_CONTINUE, mt.rcptto, "<m\252ller@example.net>")
  step(conn, "header From", SMFIR_CONTINUE, mt.header, "From", "J\252rgen <j@example.com>")
  step(conn, "header 8bit name", SMFIR_CONTINUE, mt.header, "X-N\228me", "v\228lue \255\254")
  step(conn, "header Subject", SMFIR_CONTINUE, mt.header, "Subject", "Gr\252\223e MILTERGUARD")
  step(conn, "header Message-ID", SMFIR_CONTINUE, mt.header, "Message-ID", "<eightbit@example.com>")
  step(conn, "eoh", SMFIR_CONTINUE, mt.eoh)
  step(conn, "body", SMFIR_CONTINUE, mt.bodystring, "Gr\252\223e \255\254 MILTERGUARD-CANARY-TAG\r\n")
  ok("eom", mt.eom(conn))
  expect(conn, "eom", SMFIR_ACCEPT)
  if not mt.eom_check(conn, MT_HDRADD, "X-Spam-Flag", "YES") then error("not tagged") end
  ok("disconnect", mt.disconnect(conn))
  mt.echo("milterguard_8bit.lua: ok")
end)
