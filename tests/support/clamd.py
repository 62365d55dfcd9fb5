"""A private clamd on a loopback port, with a signature database made here.

No freshclam and no downloaded databases: the database directory holds

- ``test.hdb``: the MD5 of the EICAR test file, named ``Eicar-Signature``;
- ``test.ndb``: one body signature of our own, ``Milterguard.Test.Body``,
  that matches :data:`BODY_SIGNATURE_TEXT` anywhere in a scanned stream.

clamd reports signatures of unsigned databases with ``.UNOFFICIAL``
appended (``Eicar-Signature.UNOFFICIAL``).

    with ClamdInstance(tmp_path / "clamd") as clamd:
        mg = milterguard_factory(sets={"clamav.address": clamd.address})
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from support import LOOPBACK, SupportError, free_port, stop_process, wait_until

CLAMD = "/usr/sbin/clamd"

# The EICAR anti-virus test file (https://www.eicar.org/), kept encoded so that
# no scanner on a developer's machine quarantines this source file.
EICAR = base64.b64decode(b"WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNULUZJTEUhJEgrSCo=")
EICAR_NAME = "Eicar-Signature"
BODY_SIGNATURE_TEXT = "MILTERGUARD-CLAMAV-TEST-SIGNATURE-7f3a"
BODY_SIGNATURE_NAME = "Milterguard.Test.Body"


def clamd_available() -> str | None:
    """None when clamd can run here, else the reason to skip."""
    if not os.access(CLAMD, os.X_OK):
        return f"{CLAMD} is not installed (Debian package clamav-daemon)"
    return None


def write_database(directory: Path) -> None:
    """The two test signature files, in the formats of ClamAV's signature docs."""
    directory.mkdir(parents=True, exist_ok=True)
    # .hdb: MD5:size:name of a whole file.
    (directory / "test.hdb").write_text(f"{hashlib.md5(EICAR).hexdigest()}:{len(EICAR)}:{EICAR_NAME}\n")
    # .ndb: name:target type (0 = any file):offset (* = anywhere):hex bytes.
    (directory / "test.ndb").write_text(f"{BODY_SIGNATURE_NAME}:0:*:{BODY_SIGNATURE_TEXT.encode().hex()}\n")


class ClamdInstance:
    """clamd in the foreground, on 127.0.0.1:<free port>, in *workdir*."""

    def __init__(self, workdir: Path | str, *, stream_max_length: str = "25M") -> None:
        self.workdir = Path(workdir)
        self.port = 0
        self.stream_max_length = stream_max_length
        self.proc: subprocess.Popen | None = None
        self.stopped_by_signal = False

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "clamd.log"

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def write_config(self) -> Path:
        db = self.workdir / "db"
        write_database(db)
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        conf = self.workdir / "clamd.conf"
        conf.write_text(
            "Foreground yes\n"
            f"TCPSocket {self.port}\n"
            f"TCPAddr {LOOPBACK}\n"
            f"DatabaseDirectory {db}\n"
            f"TemporaryDirectory {tmp}\n"
            f"LogFile {self.log_path}\n"
            f"PidFile {self.workdir / 'clamd.pid'}\n"
            f"StreamMaxLength {self.stream_max_length}\n"
            "MaxThreads 2\n"
            "ScanMail yes\n"
            "Bytecode no\n"
            "LogTime yes\n"
        )
        if os.geteuid() == 0:
            # As root clamd would switch to the clamav user, which cannot read tmp_path.
            shutil.chown(self.workdir, "root")
        return conf

    def start(self, timeout: float = 60.0, port: int | None = None) -> "ClamdInstance":
        """Start on a free port, or on PORT (a restart keeps its address)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        conf = self.write_config()
        out = open(self.workdir / "clamd.out", "ab")
        self.proc = subprocess.Popen([CLAMD, "--config-file", str(conf)], stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise SupportError(f"clamd exited with {self.proc.returncode}:\n{self.output()}\n{self.log_tail()}")
            return self.ping()

        wait_until(ready, timeout, interval=0.1, what="clamd to answer PING", on_timeout=self.output)
        return self

    def output(self) -> str:
        try:
            return (self.workdir / "clamd.out").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def ping(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=1.0) as s:
                s.sendall(b"nPING\n")
                return s.recv(16).strip() == b"PONG"
        except OSError:
            return False

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, clamd never answers."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.stopped_by_signal = True

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)
        self.stopped_by_signal = False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.stopped_by_signal:
            self.resume()
        stop_process(self.proc, timeout=10.0)
        self.proc = None

    def __enter__(self) -> "ClamdInstance":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
