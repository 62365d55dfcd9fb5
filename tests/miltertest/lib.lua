-- Helpers shared by the miltertest scripts in this directory.
--
-- run_miltertest() (tests/support/__init__.py) defines these globals:
--   socket   the milter socket, libmilter notation (inet:PORT@127.0.0.1)
--   testdir  this directory, so a script can start with
--            dofile(testdir .. "/lib.lua")
-- plus any name=value the Python test passes as keyword arguments.
-- Lua globals from -D are strings.

REPLY_NAMES = {
  [SMFIR_CONTINUE] = "CONTINUE", [SMFIR_ACCEPT] = "ACCEPT",
  [SMFIR_REJECT] = "REJECT", [SMFIR_TEMPFAIL] = "TEMPFAIL",
  [SMFIR_DISCARD] = "DISCARD", [SMFIR_REPLYCODE] = "REPLYCODE",
}

function reply_name(r)
  if r == nil then return "nil" end
  return REPLY_NAMES[r] or string.format("%q", tostring(r))
end

-- Raise unless a mt.* call returned nil (success).
function ok(what, err)
  if err ~= nil then
    error(what .. " failed: " .. tostring(err))
  end
end

-- Raise unless the last reply on conn is `want` (an SMFIR_* constant).
function expect(conn, what, want)
  local got = mt.getreply(conn)
  if got ~= want then
    error(string.format("%s: expected %s, got %s", what, reply_name(want), reply_name(got)))
  end
end

-- Connect to `socket`, retrying for up to ~2 s.
function open_conn()
  local conn = mt.connect(socket, 40, 0.05)
  if conn == nil then
    error("mt.connect(" .. tostring(socket) .. ") failed")
  end
  return conn
end

-- Run one step and check its reply, e.g.
--   step(conn, "mailfrom", SMFIR_CONTINUE, mt.mailfrom, "<a@example.com>")
function step(conn, what, want, fn, ...)
  ok(what, fn(conn, ...))
  expect(conn, what, want)
end

-- miltertest exits 1 on a Lua error but prints nothing; run the script
-- body through main() so the error and a traceback reach stderr:
--   main(function() ... end)
function main(fn)
  local good, err = xpcall(fn, debug.traceback)
  if not good then
    io.stderr:write("miltertest script failed: " .. tostring(err) .. "\n")
    io.stderr:flush()
    error(err, 0)
  end
end
