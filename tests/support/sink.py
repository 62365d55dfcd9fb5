"""A minimal SMTP sink on loopback that keeps every message in memory.

Postfix relays to it (``relayhost = [127.0.0.1]:PORT``).  It is a real
SMTP server (threads + :mod:`socketserver`, no extra package), so it copes
with a client that pipelines: every command is read line by line from a
buffered stream and answered in order.  It does not advertise PIPELINING,
CHUNKING or STARTTLS.

Fault mode: :meth:`SmtpSink.fail` makes it answer 4xx/5xx at a chosen
stage (``connect``, ``mail``, ``rcpt`` or ``data``), optionally only for
the next N transactions, to test retries and queueing.

Usage::

    with SmtpSink() as sink:
        ...  # point Postfix at sink.port
        [msg] = sink.wait_for(1, timeout=10)
        assert msg.mail_from == "a@example.com"
"""

from __future__ import annotations

import email
import email.message
import email.policy
import socketserver
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from . import LOOPBACK, SupportError

__all__ = ["ReceivedMessage", "SmtpSink"]

MAX_LINE = 1 << 20  # generous; Postfix never sends longer lines than 998+2
STAGES = ("connect", "mail", "rcpt", "data")


@dataclass
class ReceivedMessage:
    """One message accepted by the sink (one SMTP transaction)."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # as received, CRLF line ends, dot-stuffing removed
    helo: str
    peer: tuple[str, int]
    mail_options: list[str] = field(default_factory=list)
    received_at: float = field(default_factory=time.time)

    @property
    def message(self) -> email.message.EmailMessage:
        """The data parsed with the default (modern) policy."""
        return email.message_from_bytes(self.data, policy=email.policy.default)

    def header(self, name: str) -> str | None:
        return self.message.get(name)

    @property
    def message_id(self) -> str | None:
        return self.header("Message-ID")

    @property
    def body(self) -> bytes:
        """The raw body: everything after the first empty line."""
        _, sep, body = self.data.partition(b"\r\n\r\n")
        return body if sep else b""


@dataclass
class _Fault:
    code: int
    text: str
    stage: str
    remaining: int | None  # None = until heal()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, addr, sink: "SmtpSink"):
        self.sink = sink
        super().__init__(addr, _Handler)


class _Handler(socketserver.StreamRequestHandler):
    timeout = 60  # a stuck client must not keep a thread forever

    def reply(self, code: int, text: str | list[str]) -> None:
        lines = [text] if isinstance(text, str) else text
        out = []
        for i, line in enumerate(lines):
            sep = "-" if i < len(lines) - 1 else " "
            out.append(f"{code}{sep}{line}\r\n")
        self.wfile.write("".join(out).encode("utf-8", "surrogateescape"))
        self.wfile.flush()

    def readline(self) -> bytes | None:
        line = self.rfile.readline(MAX_LINE)
        if not line:
            return None
        return line

    def handle(self) -> None:  # noqa: C901 - a small state machine
        sink: SmtpSink = self.server.sink
        name = sink.hostname
        fault = sink._take_fault("connect")
        if fault:
            self.reply(fault.code, fault.text)
            return
        self.reply(220, f"{name} ESMTP test sink")
        helo = ""
        mail_from: str | None = None
        mail_options: list[str] = []
        rcpts: list[str] = []
        while True:
            raw = self.readline()
            if raw is None:
                return
            line = raw.decode("utf-8", "surrogateescape").rstrip("\r\n")
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            sink._log_command(line)
            if verb == "EHLO":
                helo = arg.strip()
                mail_from, rcpts = None, []
                self.reply(250, [name, "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
                                 "SIZE 104857600"])
            elif verb == "HELO":
                helo = arg.strip()
                mail_from, rcpts = None, []
                self.reply(250, name)
            elif verb == "MAIL":
                if mail_from is not None:
                    self.reply(503, "5.5.1 Error: nested MAIL command")
                    continue
                addr, params = _parse_path(arg, "FROM:")
                if addr is None:
                    self.reply(501, "5.5.4 Syntax: MAIL FROM:<address>")
                    continue
                fault = sink._take_fault("mail")
                if fault:
                    self.reply(fault.code, fault.text)
                    continue
                mail_from, mail_options, rcpts = addr, params, []
                self.reply(250, "2.1.0 Ok")
            elif verb == "RCPT":
                if mail_from is None:
                    self.reply(503, "5.5.1 Error: need MAIL command")
                    continue
                addr, _params = _parse_path(arg, "TO:")
                if not addr:
                    self.reply(501, "5.5.4 Syntax: RCPT TO:<address>")
                    continue
                fault = sink._take_fault("rcpt")
                if fault:
                    self.reply(fault.code, fault.text)
                    continue
                rcpts.append(addr)
                self.reply(250, "2.1.5 Ok")
            elif verb == "DATA":
                if mail_from is None or not rcpts:
                    self.reply(503, "5.5.1 Error: need RCPT command")
                    continue
                self.reply(354, "End data with <CR><LF>.<CR><LF>")
                chunks: list[bytes] = []
                while True:
                    raw = self.readline()
                    if raw is None:
                        return  # connection lost mid-data: nothing stored
                    if raw in (b".\r\n", b".\n"):
                        break
                    if raw.startswith(b"."):
                        raw = raw[1:]
                    chunks.append(raw)
                fault = sink._take_fault("data")
                if fault:
                    self.reply(fault.code, fault.text)
                else:
                    msg = ReceivedMessage(
                        mail_from=mail_from,
                        rcpt_tos=list(rcpts),
                        data=b"".join(chunks),
                        helo=helo,
                        peer=self.client_address,
                        mail_options=mail_options,
                    )
                    n = sink._store(msg)
                    self.reply(250, f"2.0.0 Ok: queued as SINK{n}")
                mail_from, mail_options, rcpts = None, [], []
            elif verb == "RSET":
                mail_from, mail_options, rcpts = None, [], []
                self.reply(250, "2.0.0 Ok")
            elif verb == "NOOP":
                self.reply(250, "2.0.0 Ok")
            elif verb == "VRFY":
                self.reply(252, "2.0.0 Cannot VRFY")
            elif verb == "QUIT":
                self.reply(221, "2.0.0 Bye")
                return
            else:
                self.reply(502, "5.5.2 Error: command not recognized")


def _parse_path(arg: str, prefix: str) -> tuple[str | None, list[str]]:
    """Parse ``FROM:<addr> PARAMS`` -> (addr, params); (None, []) if bad."""
    if not arg[: len(prefix)].upper() == prefix:
        return None, []
    rest = arg[len(prefix):].strip()
    if not rest.startswith("<"):
        # Be lenient: "MAIL FROM:addr"
        parts = rest.split()
        return (parts[0] if parts else None), parts[1:]
    end = rest.find(">")
    if end < 0:
        return None, []
    return rest[1:end], rest[end + 1:].split()


class SmtpSink:
    """SMTP server on 127.0.0.1 (free port) that stores what it receives.

    ``hostname`` is what it says in its greeting and EHLO reply; it must
    differ from Postfix's ``myhostname`` or Postfix reports a mail loop.
    """

    def __init__(self, host: str = LOOPBACK, port: int = 0, *,
                 hostname: str = "sink.test.invalid") -> None:
        self.host = host
        self.hostname = hostname
        self._requested_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._messages: list[ReceivedMessage] = []
        self._faults: list[_Fault] = []
        self.commands: list[str] = []  # every command line seen, for debugging

    # -- lifecycle ---------------------------------------------------
    def start(self) -> "SmtpSink":
        if self._server is not None:
            return self
        # Binding port 0 here means the kernel picks the port: no race.
        self._server = _Server((self.host, self._requested_port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
            name=f"smtp-sink-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "SmtpSink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise SupportError("sink is not running")
        return self._server.server_address[1]

    @property
    def address(self) -> str:
        """The ``[host]:port`` form that Postfix's relayhost wants."""
        return f"[{self.host}]:{self.port}"

    # -- faults ------------------------------------------------------
    def fail(self, code: int = 451, text: str = "4.3.0 sink: try again later", *,
             stage: str = "data", times: int | None = None) -> None:
        """Answer *code* at *stage* for the next *times* hits (None = until heal())."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}")
        with self._cond:
            self._faults.append(_Fault(code, text, stage, times))

    def heal(self) -> None:
        with self._cond:
            self._faults.clear()

    def _take_fault(self, stage: str) -> _Fault | None:
        with self._cond:
            for f in self._faults:
                if f.stage != stage:
                    continue
                if f.remaining is not None:
                    f.remaining -= 1
                    if f.remaining <= 0:
                        self._faults.remove(f)
                return f
        return None

    # -- messages ----------------------------------------------------
    def _store(self, msg: ReceivedMessage) -> int:
        with self._cond:
            self._messages.append(msg)
            self._cond.notify_all()
            return len(self._messages)

    def _log_command(self, line: str) -> None:
        with self._cond:
            if len(self.commands) < 10000:
                self.commands.append(line)

    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._cond:
            return list(self._messages)

    def clear(self) -> None:
        with self._cond:
            self._messages.clear()

    def wait_for(self, what: int | Callable[[ReceivedMessage], bool] = 1,
                 timeout: float = 10.0) -> list[ReceivedMessage]:
        """Wait until messages arrive; return them.

        - ``wait_for(3)``: at least 3 messages in total; returns all.
        - ``wait_for(pred)``: at least one message matching *pred*;
          returns the matching ones.

        Raises :class:`SupportError` at the deadline.
        """
        if callable(what):
            def ready() -> list[ReceivedMessage]:
                return [m for m in self._messages if what(m)]
            desc = "a matching message"
        else:
            count = int(what)

            def ready() -> list[ReceivedMessage]:
                return list(self._messages) if len(self._messages) >= count else []
            desc = f"{count} message(s)"
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = ready()
                if found:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SupportError(
                        f"sink: timed out after {timeout:.1f}s waiting for {desc}; "
                        f"have {len(self._messages)} message(s)")
                self._cond.wait(remaining)

    def wait_for_message_id(self, message_id: str, timeout: float = 10.0) -> ReceivedMessage:
        want = message_id.strip()
        return self.wait_for(lambda m: (m.message_id or "").strip() == want, timeout)[0]
