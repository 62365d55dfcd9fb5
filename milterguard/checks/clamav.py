"""Virus scanning through clamd (INSTREAM over TCP or a unix socket).

The message as received (or each decoded attachment, by `clamav.scan`) is
streamed to clamd with the `clamd` library.  A signature found gives
CLAMAV_VIRUS with the signature name as its option; CLAMAV_VIRUS has a
fixed action in rules/clamav.yaml (reject unless overridden).  clamd down,
slow or answering an error gives CLAMAV_TEMPFAIL and the message goes on
(fail-open): the socket timeout is bounded by what is left of the
message's time budget.
"""

from __future__ import annotations

import io
import logging
import socket
import struct
import time

from milterguard.engine.checks import check
from milterguard.engine.model import Hits, Stage
from milterguard.settings import parse_clamd_address

log = logging.getLogger("milterguard.clamav")

MAX_ATTACHMENTS = 20  # parts streamed one by one when clamav.scan is "attachments"
_announced: set[str] = set()


CHUNK = 64 * 1024


_LIBRARY = None  # (clamd module, TCP client class, unix socket client class) once imported


def _library():
    """The clamd library and our clients built on it, imported on first use.

    `import clamd` pulls in pkg_resources (about 10 MB resident and 85 ms at
    start-up), which a filter without `clamav.address` never needs.
    """
    global _LIBRARY
    if _LIBRARY is None:
        import clamd

        class Instream:
            """INSTREAM as the library does it, in larger chunks, reading clamd's answer even when
            clamd stopped reading (past its StreamMaxLength it answers, then closes)."""

            def instream(self, buff) -> dict:
                try:
                    self._init_socket()
                    self._send_command("INSTREAM")
                    try:
                        chunk = buff.read(CHUNK)
                        while chunk:
                            self.clamd_socket.sendall(struct.pack("!L", len(chunk)) + chunk)
                            chunk = buff.read(CHUNK)
                        self.clamd_socket.sendall(struct.pack("!L", 0))
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # clamd closed its side: its answer says why
                    result = self._recv_response()
                    if result == "INSTREAM size limit exceeded. ERROR":
                        raise clamd.BufferTooLongError(result)
                    if not result:
                        raise clamd.ConnectionError("clamd closed the connection without an answer")
                    filename, reason, status = self._parse_response(result)
                    return {filename: (status, reason)}
                finally:
                    self._close_socket()

        class TcpClient(Instream, clamd.ClamdNetworkSocket):
            """The library's TCP client with the timeout on connect as well (it sets it after)."""

            def _init_socket(self) -> None:
                # The library closes clamd_socket in a finally clause: it must exist even when connect fails.
                family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
                self.clamd_socket = socket.socket(family, socket.SOCK_STREAM)
                try:
                    self.clamd_socket.settimeout(self.timeout)
                    self.clamd_socket.connect((self.host, self.port))
                except OSError as exc:
                    raise clamd.ConnectionError(f"cannot connect to {self.host}:{self.port}: {exc}") from None

        class UnixClient(Instream, clamd.ClamdUnixSocket):
            def _init_socket(self) -> None:
                try:
                    self.clamd_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self.clamd_socket.settimeout(self.timeout)
                    self.clamd_socket.connect(self.unix_socket)
                except OSError as exc:
                    raise clamd.ConnectionError(f"cannot connect to {self.unix_socket}: {exc}") from None

        _LIBRARY = (clamd, TcpClient, UnixClient)
    return _LIBRARY


def client_for(address: str, timeout: float):
    """A clamd client for `HOST:PORT`, `[V6]:PORT`, `/path` or `unix:/path`."""
    where, port = parse_clamd_address(address)  # the configuration has checked it
    _clamd, tcp_client, unix_client = _library()
    if port is None:
        return unix_client(where, timeout=timeout)
    return tcp_client(where, port, timeout=timeout)


class _Joined(io.RawIOBase):
    """A read-only stream over header bytes followed by the body (bytes or a spooled file)."""

    def __init__(self, head: bytes, body, limit: int) -> None:
        self._head = io.BytesIO(head)
        if isinstance(body, (bytes, bytearray, memoryview)):
            self._body = io.BytesIO(bytes(body))
        else:
            body.seek(0)
            self._body = body
        self._left = limit

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        size = self._left if size is None or size < 0 else min(size, self._left)
        data = self._head.read(size)
        if len(data) < size:
            data += self._body.read(size - len(data))
        self._left -= len(data)
        return data


def _message_stream(txn, limit: int) -> tuple[_Joined, int]:
    head = b"".join(
        (n if isinstance(n, bytes) else n.encode("utf-8", "surrogateescape")) + b": "
        + (v if isinstance(v, bytes) else v.encode("utf-8", "surrogateescape")) + b"\r\n"
        for n, v in txn.headers
    ) + b"\r\n"
    body = txn.body if txn.body is not None else b""
    size = len(head) + (txn.body_size or (len(body) if isinstance(body, (bytes, bytearray)) else 0))
    return _Joined(head, body, limit), size


def _scan(client, stream) -> tuple[str, str | None]:
    """('FOUND', name), ('OK', None) or ('ERROR', text) for one stream."""
    result = client.instream(stream)
    if not result:
        return "ERROR", "empty answer"
    status, name = next(iter(result.values()))
    return status, name


@check(stage=Stage.EOM, emits=("CLAMAV_VIRUS", "CLAMAV_TEMPFAIL", "CLAMAV_TOO_LARGE"), priority=70,
       active=lambda config: bool(config["clamav.address"]))
def clamav(scan, hits: Hits) -> None:
    """Stream the message (or its attachments) to clamd and report the signature found."""
    config = scan.config
    address = config["clamav.address"]
    if not address:
        if "" not in _announced:
            _announced.add("")
            log.info("virus scanning is off: clamav.address is empty")
        return
    txn = scan.txn
    ref = txn.queue_id or scan.conn.ident
    left = config["checks.message_budget"] - (time.monotonic() - txn.started)
    timeout = max(0.05, min(config["clamav.timeout"], left))
    limit = config["clamav.max_size"]
    client = client_for(address, timeout)
    clamd = _library()[0]
    if config["clamav.scan"] == "message":
        stream, size = _message_stream(txn, limit)
        if size > limit:
            hits.add("CLAMAV_TOO_LARGE", f"{size} bytes", where="clamd", text=f"{size} > clamav.max_size {limit}")
            return
        streams = [("message", stream)]
    else:
        streams = []
        for part in scan.message.attachments[:MAX_ATTACHMENTS]:
            if part.size > limit:
                hits.add("CLAMAV_TOO_LARGE", f"{part.size} bytes", where="clamd", text=part.filename or part.content_type)
                continue
            streams.append((part.filename or part.content_type, io.BytesIO(part.payload)))
    t0 = time.monotonic()
    for what, stream in streams:
        try:
            status, name = _scan(client, stream)
        except clamd.BufferTooLongError:
            hits.add("CLAMAV_TOO_LARGE", what, where="clamd", text="clamd: INSTREAM size limit exceeded")
            continue
        except (clamd.ClamdError, OSError) as exc:
            # OSError: a send that timed out or failed otherwise.
            reason = "timeout" if isinstance(exc, TimeoutError) or "timed out" in str(exc) else "unavailable"
            log.warning("clamd %s for %s after %.2fs: %s", reason, ref, time.monotonic() - t0, exc)
            hits.add("CLAMAV_TEMPFAIL", reason, where="clamd", text=str(exc)[:160])
            return
        if status == "FOUND":
            log.info("clamd found %s in %s of %s", name, what, ref)
            hits.add("CLAMAV_VIRUS", name, where="clamd", text=f"{name} in {what}")
        elif status != "OK":
            log.warning("clamd answered an error for %s: %s", ref, name)
            hits.add("CLAMAV_TEMPFAIL", "error", where="clamd", text=str(name)[:160])
            return
