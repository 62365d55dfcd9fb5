"""A clamd client: INSTREAM over TCP or a unix socket.

clamd's protocol is small (a command, then the data as length-prefixed
chunks, a zero-length chunk to end, and one answer line), so it is spoken
here directly: every socket operation, connect included, is bounded by the
caller's timeout, the chunks are large, and clamd's answer is read even
when it stopped reading at its StreamMaxLength.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import BinaryIO

from milterguard.settingtypes import parse_clamd_address

CHUNK = 64 * 1024
MAX_ANSWER = 4096


class ClamdError(Exception):
    """clamd could not be asked, or gave no usable answer."""


class ClamdTooLarge(ClamdError):
    """clamd refused the stream: it is past its StreamMaxLength."""


@dataclass(frozen=True)
class Result:
    """clamd's answer for one stream: status OK, FOUND or ERROR, and the signature or error."""

    status: str
    detail: str = ""


class Clamd:
    """INSTREAM scans against one clamd, each on a fresh connection."""

    def __init__(self, address: str, timeout: float) -> None:
        # The configuration checked the address when it was read (settings.ClamdAddress).
        self.where, self.port = parse_clamd_address(address)
        self.address = self.where if self.port is None else f"{self.where}:{self.port}"
        self.timeout = timeout

    def _connect(self) -> socket.socket:
        if self.port is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: object = self.where
        else:
            sock = socket.socket(socket.AF_INET6 if ":" in self.where else socket.AF_INET, socket.SOCK_STREAM)
            target = (self.where, self.port)
        sock.settimeout(self.timeout)
        try:
            sock.connect(target)
        except OSError as exc:
            sock.close()
            raise ClamdError(f"cannot connect to {self.address}: {exc}") from None
        return sock

    def instream(self, stream: BinaryIO) -> Result:
        """Scan what STREAM gives until it ends; raise ClamdError when clamd cannot answer."""
        sock = self._connect()
        try:
            try:
                sock.sendall(b"zINSTREAM\0")
                chunk = stream.read(CHUNK)
                while chunk:
                    sock.sendall(struct.pack("!L", len(chunk)) + chunk)
                    chunk = stream.read(CHUNK)
                sock.sendall(struct.pack("!L", 0))
            except (BrokenPipeError, ConnectionResetError):
                pass  # clamd closed its side (past its StreamMaxLength): its answer says why
            answer = self._answer(sock)
        except OSError as exc:  # a send or read that timed out or failed otherwise
            raise ClamdError(f"{self.address}: {exc}") from None
        finally:
            sock.close()
        return self._parse(answer)

    @staticmethod
    def _answer(sock: socket.socket) -> str:
        data = b""
        while b"\0" not in data and len(data) < MAX_ANSWER:
            try:
                got = sock.recv(MAX_ANSWER)
            except ConnectionResetError:
                break
            if not got:
                break
            data += got
        return data.split(b"\0", 1)[0].decode("utf-8", "replace").strip()

    def _parse(self, answer: str) -> Result:
        if not answer:
            raise ClamdError(f"{self.address} closed the connection without an answer")
        if answer == "INSTREAM size limit exceeded. ERROR":
            raise ClamdTooLarge(answer)
        # "stream: OK", "stream: Eicar-Signature FOUND", "...: some error ERROR"
        _name, _, rest = answer.partition(": ")
        if rest.endswith(" FOUND"):
            return Result("FOUND", rest[:-6])
        if rest == "OK":
            return Result("OK")
        if rest.endswith(" ERROR"):
            return Result("ERROR", rest[:-6])
        return Result("ERROR", answer)
