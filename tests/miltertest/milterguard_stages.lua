-- milterguard through the milter protocol, for the stages Postfix does not easily show:
-- an IPv6 client, an unknown command, two transactions on one connection with an
-- abort (RSET) between them, forged X-Spam headers removed, a blocked IPv4 client
-- refused at RCPT with its reply code, and the verdicts of each message.
-- Globals: socket, testdir (see lib.lua).
dofile(testdir .. "/lib.lua")

local function message(conn, qid, body, extra)
  mt.macro(conn, SMFIC_MAIL, "i", qid, "{mail_addr}", "sender@example.com")
  step(conn, "mailfrom " .. qid, SMFIR_CONTINUE, mt.mailfrom, "<sender@example.com>")
  step(conn, "rcptto " .. qid, SMFIR_CONTINUE, mt.rcptto, "<rcpt@example.net>")
  step(conn, "header From", SMFIR_CONTINUE, mt.header, "From", "Sender <sender@example.com>")
  step(conn, "header To", SMFIR_CONTINUE, mt.header, "To", "rcpt@example.net")
  step(conn, "header Subject", SMFIR_CONTINUE, mt.header, "Subject", "stage test " .. qid)
  step(conn, "header Date", SMFIR_CONTINUE, mt.header, "Date", "Mon, 02 Jan 2023 10:00:00 +0000")
  step(conn, "header Message-ID", SMFIR_CONTINUE, mt.header, "Message-ID", "<" .. qid .. "@example.com>")
  for _, h in ipairs(extra or {}) do
    step(conn, "header " .. h[1], SMFIR_CONTINUE, mt.header, h[1], h[2])
  end
  step(conn, "eoh", SMFIR_CONTINUE, mt.eoh)
  step(conn, "body", SMFIR_CONTINUE, mt.bodystring, body)
end

main(function()
  -- An IPv6 client, an unknown command, then a message that is aborted half way.
  local conn = open_conn()
  -- No reply is asked where none can change the outcome (each header above all);
  -- RCPT and end of headers keep theirs, for early verdicts.
  for _, opt in ipairs({SMFIP_NR_CONN, SMFIP_NR_HELO, SMFIP_NR_MAIL, SMFIP_NR_HDR,
                        SMFIP_NR_DATA, SMFIP_NR_UNKN, SMFIP_NR_BODY}) do
    if not mt.test_option(conn, opt) then
      error(string.format("no-reply option 0x%x was not negotiated", opt))
    end
  end
  for _, opt in ipairs({SMFIP_NR_RCPT, SMFIP_NR_EOH}) do
    if mt.test_option(conn, opt) then
      error(string.format("option 0x%x was negotiated, yet that stage can answer", opt))
    end
  end
  step(conn, "conninfo v6", SMFIR_CONTINUE, mt.conninfo, "mx6.example.org", "2001:db8::25")
  step(conn, "helo", SMFIR_CONTINUE, mt.helo, "mx6.example.org")
  ok("unknown", mt.unknown(conn, "XFOO bar"))
  mt.macro(conn, SMFIC_MAIL, "i", "ABORTED1")
  step(conn, "mailfrom", SMFIR_CONTINUE, mt.mailfrom, "<x@example.com>")
  step(conn, "rcptto", SMFIR_CONTINUE, mt.rcptto, "<y@example.net>")
  ok("abort", mt.abort(conn))

  -- Second transaction on the same connection: tag canary, forged headers removed.
  message(conn, "TAGGED2", "MILTERGUARD-CANARY-TAG\r\n",
          {{"X-Spam-Flag", "NO"}, {"X-Spam-Score", "-50"}, {"X-Spam-Flag", "NO"}})
  ok("eom", mt.eom(conn))
  expect(conn, "eom TAGGED2", SMFIR_ACCEPT)
  if not mt.eom_check(conn, MT_HDRDELETE, "X-Spam-Score") then error("forged X-Spam-Score not removed") end
  if not mt.eom_check(conn, MT_HDRDELETE, "X-Spam-Flag") then error("forged X-Spam-Flag not removed") end
  if not mt.eom_check(conn, MT_HDRADD, "X-Spam-Flag", "YES") then error("X-Spam-Flag: YES not added") end
  if not mt.eom_check(conn, MT_HDRCHANGE, "Subject", "[SPAM] stage test TAGGED2") then error("subject not tagged") end

  -- Third transaction: the reject canary is refused at end of message with our code.
  message(conn, "REJECT3", "MILTERGUARD-CANARY-REJECT\r\n")
  ok("eom", mt.eom(conn))
  expect(conn, "eom REJECT3", SMFIR_REPLYCODE)
  ok("disconnect", mt.disconnect(conn))

  -- A client in the block map: refused at the first RCPT.
  local bad = open_conn()
  step(bad, "conninfo blocked", SMFIR_CONTINUE, mt.conninfo, "bad.example.net", "192.0.2.66")
  step(bad, "helo", SMFIR_CONTINUE, mt.helo, "bad.example.net")
  step(bad, "mailfrom", SMFIR_CONTINUE, mt.mailfrom, "<x@example.com>")
  step(bad, "rcptto", SMFIR_REPLYCODE, mt.rcptto, "<y@example.net>")
  ok("disconnect", mt.disconnect(bad))
  mt.echo("milterguard_stages.lua: ok")
end)
