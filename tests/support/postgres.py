"""A private PostgreSQL cluster on loopback, for the quarantine's shared backend.

initdb and the server run as an unprivileged user (PostgreSQL refuses root):
``nobody`` when the tests run as root, else the tests' own user.  The cluster
lives in a temporary directory of that user, listens on 127.0.0.1 at a free
port (its unix socket in the same directory) and trusts local connections of
the role ``milterguard``.  ``stop()`` stops it; ``start()`` starts it again
on the same port (to test a store that goes away and comes back).

Usage::

    pg = PostgresCluster().start()
    url = pg.url  # postgresql://milterguard@127.0.0.1:PORT/quarantine
    pg.stop(); pg.start(); pg.destroy()
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from . import LOOPBACK, SupportError, free_port

__all__ = ["PostgresCluster", "postgres_available"]

BIN = Path(os.environ.get("MILTERGUARD_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _bin_dir() -> Path | None:
    if (BIN / "initdb").exists():
        return BIN
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


def postgres_available() -> str | None:
    """None if a private cluster can run here, else the reason it cannot."""
    if _bin_dir() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) are not installed"
    return None


class PostgresCluster:
    def __init__(self, database: str = "quarantine", role: str = "milterguard") -> None:
        self.bin = _bin_dir()
        if self.bin is None:
            raise SupportError("PostgreSQL is not installed")
        self.user = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self.dir = Path(tempfile.mkdtemp(prefix="mg-pg-"))
        if os.geteuid() == 0:
            os.chown(self.dir, pwd.getpwnam(self.user).pw_uid, pwd.getpwnam(self.user).pw_gid)
        self.data = self.dir / "data"
        self.port = free_port()
        self.database, self.role = database, role
        self._initialised = False

    @property
    def url(self) -> str:
        return f"postgresql://{self.role}@{LOOPBACK}:{self.port}/{self.database}"

    def _run(self, *argv: str) -> str:
        cmd = [str(self.bin / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        proc = subprocess.run(cmd, cwd=self.dir, capture_output=True, text=True, timeout=120)
        if proc.returncode:
            raise SupportError(f"{' '.join(argv[:2])} failed ({proc.returncode}): {proc.stderr[-2000:]}"
                               + self.log_tail())
        return proc.stdout

    def log_tail(self) -> str:
        log = self.dir / "postgres.log"
        return "\n--- postgres.log ---\n" + log.read_text()[-3000:] if log.exists() else ""

    def start(self) -> "PostgresCluster":
        if not self._initialised:
            self._run("initdb", "-D", str(self.data), "-U", self.role, "--auth=trust", "-E", "UTF8",
                      "--no-instructions")
        options = f"-p {self.port} -k {self.dir} -c listen_addresses={LOOPBACK} -c fsync=off"
        # -w: pg_ctl polls until the server accepts connections (or its own deadline).
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "postgres.log"), "-o", options, "-w",
                  "-t", "60", "start")
        if not self._initialised:
            self._run("createdb", "-h", LOOPBACK, "-p", str(self.port), "-U", self.role, self.database)
            self._initialised = True
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
