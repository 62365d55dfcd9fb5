-- The no-op milter (tests/support/noop_milter.py) accepts everything and
-- changes nothing.  Two messages on one connection.
-- Globals: socket, testdir (see lib.lua); optional client_ip, queue_id.
dofile(testdir .. "/lib.lua")

local client_ip = client_ip or "127.0.0.1"
local queue_id = queue_id or "NOOPTEST"

main(function()
  local conn = open_conn()

  -- It asks the MTA not to wait for the early replies.
  for _, opt in ipairs({SMFIP_NR_CONN, SMFIP_NR_HELO, SMFIP_NR_MAIL,
                        SMFIP_NR_RCPT, SMFIP_NR_HDR, SMFIP_NR_EOH}) do
    if not mt.test_option(conn, opt) then
      error(string.format("no-reply option 0x%x was not negotiated", opt))
    end
  end

  mt.macro(conn, SMFIC_CONNECT, "j", "mx.test.invalid", "{client_addr}", client_ip,
           "{daemon_name}", "smtpd")
  step(conn, "conninfo", SMFIR_CONTINUE, mt.conninfo, "client.example.org", client_ip)
  step(conn, "helo", SMFIR_CONTINUE, mt.helo, "client.example.org")

  for n = 1, 2 do
    local qid = queue_id .. n
    mt.macro(conn, SMFIC_MAIL, "i", qid, "{mail_addr}", "sender@example.com")
    step(conn, "mailfrom", SMFIR_CONTINUE, mt.mailfrom, "<sender@example.com>")
    mt.macro(conn, SMFIC_RCPT, "i", qid, "{rcpt_addr}", "rcpt@example.net")
    step(conn, "rcptto", SMFIR_CONTINUE, mt.rcptto, "<rcpt@example.net>")
    step(conn, "header From", SMFIR_CONTINUE, mt.header, "From", "Sender <sender@example.com>")
    step(conn, "header To", SMFIR_CONTINUE, mt.header, "To", "rcpt@example.net")
    step(conn, "header Subject", SMFIR_CONTINUE, mt.header, "Subject", "noop " .. n)
    step(conn, "header Message-ID", SMFIR_CONTINUE, mt.header, "Message-ID",
         "<noop-" .. n .. "@example.com>")
    step(conn, "eoh", SMFIR_CONTINUE, mt.eoh)
    step(conn, "body", SMFIR_CONTINUE, mt.bodystring, "Hello.\r\nNothing to see here.\r\n")
    step(conn, "eom", SMFIR_ACCEPT, mt.eom)

    -- MT_SMTPREPLY is left out: despite the man page it needs a code
    -- argument; a custom reply would show as SMFIR_REPLYCODE anyway.
    for _, what in ipairs({"MT_HDRADD", "MT_HDRINSERT", "MT_HDRCHANGE", "MT_HDRDELETE",
                           "MT_BODYCHANGE", "MT_QUARANTINE"}) do
      if mt.eom_check(conn, _G[what]) then
        error("the no-op milter did " .. what .. " on message " .. n)
      end
    end
    mt.echo("noop.lua: message " .. n .. " accepted")
  end

  ok("disconnect", mt.disconnect(conn))
  mt.echo("noop.lua: ok")
end)
