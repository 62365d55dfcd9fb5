#!/usr/bin/env python3
"""A pymilter milter that does nothing: the baseline for tests and benchmarks.

Run it::

    python tests/support/noop_milter.py inet:PORT@127.0.0.1 [-v]

connect, hello, envfrom, envrcpt, header and eoh are ``@Milter.noreply``
(Postfix does not wait for them), body answers CONTINUE, and eom answers
ACCEPT.  It asks for no message-modification actions.  With ``-v`` it
prints one line per callback to stdout (``noop: eom i=QUEUEID ...``) so a
test can see that Postfix really consulted it; leave ``-v`` off in
benchmarks.

:class:`NoopMilterProcess` runs it as a child process (importing this
module does not import pymilter).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from . import MilterProcess
except ImportError:  # run as a script: tests/ is not on sys.path yet
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from support import MilterProcess

__all__ = ["NoopMilterProcess", "main"]


def _make_class(verbose: bool):
    import Milter

    def say(*parts: object) -> None:
        if verbose:
            print("noop:", *parts, flush=True)

    class NoopMilter(Milter.Base):
        """Accepts everything; replies only where Postfix must wait."""

        def __init__(self) -> None:
            self.id = Milter.uniqueID()

        @Milter.noreply
        def connect(self, hostname, family, hostaddr):
            say("connect", hostname, hostaddr, self.getsymval("{client_addr}"))
            return Milter.CONTINUE

        @Milter.noreply
        def hello(self, hostname):
            say("helo", hostname)
            return Milter.CONTINUE

        @Milter.noreply
        def envfrom(self, mailfrom, *params):
            say("mail", mailfrom, *params)
            return Milter.CONTINUE

        @Milter.noreply
        def envrcpt(self, rcpt, *params):
            say("rcpt", rcpt, "i=%s" % self.getsymval("i"))
            return Milter.CONTINUE

        @Milter.noreply
        def header(self, name, value):
            return Milter.CONTINUE

        @Milter.noreply
        def eoh(self):
            return Milter.CONTINUE

        def body(self, chunk):
            return Milter.CONTINUE

        def eom(self):
            say("eom", "i=%s" % self.getsymval("i"))
            return Milter.ACCEPT

        def close(self):
            return Milter.CONTINUE

        def abort(self):
            return Milter.CONTINUE

    return NoopMilter


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("socket", help="libmilter socket: inet:PORT@HOST or unix:PATH")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each callback")
    ap.add_argument("--timeout", type=int, default=600,
                    help="seconds libmilter waits for the MTA (default 600)")
    args = ap.parse_args(argv)

    import Milter

    Milter.factory = _make_class(args.verbose)
    Milter.set_flags(0)  # no actions: we never modify a message
    print(f"noop milter listening on {args.socket}", flush=True)
    Milter.runmilter("noop", args.socket, timeout=args.timeout)
    print("noop milter stopped", flush=True)
    return 0


class NoopMilterProcess(MilterProcess):
    """``noop_milter.py`` as a child process in *workdir*.

    ``socket`` defaults to ``inet:<free port>@127.0.0.1`` (libmilter
    notation; ``.postfix_socket`` gives Postfix's); output goes to
    ``workdir/noop_milter.log``.
    """

    def __init__(self, workdir, *, socket: str | None = None, verbose: bool = True,
                 timeout: int = 600) -> None:
        super().__init__(workdir, socket=socket, log_name="noop_milter.log")
        self.verbose = verbose
        self.timeout = timeout

    def argv(self) -> list[str]:
        cmd = [sys.executable, str(Path(__file__).resolve()), self.socket,
               "--timeout", str(self.timeout)]
        if self.verbose:
            cmd.append("-v")
        return cmd

    def events(self, kind: str | None = None) -> list[str]:
        """The ``noop: ...`` lines it printed (``-v``), optionally of one kind."""
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("noop: "):
                rest = line[len("noop: "):]
                if kind is None or rest.split(" ", 1)[0] == kind:
                    out.append(rest)
        return out


if __name__ == "__main__":
    sys.exit(main())
