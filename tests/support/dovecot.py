"""A private Dovecot IMAP server for tests: one user, Maildir, on a free loopback port.

    server = DovecotServer.start(tmp_path / "dovecot", extra_conf=snippet,
                                 files={"sieve/learn-spam.sieve": text, "bin/learn-spam": script})
    with server.imap() as imap:      # logged in as DovecotServer.USER
        ...
    server.stop()

Everything lives in the work directory: the configuration, the run and state
directories, the log and the Maildir.  `files` are written there first (a text
starting with `#!` is made executable), so that `extra_conf` can name them.

Dovecot never runs mail processes as root.  Under root the mail user is
`nobody` and the Dovecot processes use the `dovecot` and `dovenull` users of
the Debian package; the work directory and its parents up to the temporary
root are then made traversable (o+x) and the Maildir is given to `nobody`.
Under another user, every process runs as that user.
"""

from __future__ import annotations

import getpass
import imaplib
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from support import LOOPBACK, SupportError, free_port, port_accepts, stop_process, wait_until

__all__ = ["DovecotServer", "dovecot_available"]


def dovecot_available() -> str | None:
    """None when Dovecot with the Sieve plugins is installed, else why not."""
    if not shutil.which("dovecot"):
        return "dovecot is not installed (Debian: dovecot-imapd)"
    if not shutil.which("sievec"):
        return "sievec is not installed (Debian: dovecot-sieve)"
    return None


class DovecotServer:
    USER = "alice"
    PASSWORD = "secret"

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = Path(workdir)
        self.port = port
        self.conf_path = self.workdir / "dovecot.conf"
        self.log_path = self.workdir / "dovecot.log"
        self.proc: subprocess.Popen | None = None
        root = os.geteuid() == 0
        self.mail_user = "nobody" if root else getpass.getuser()
        self.internal_user = "dovecot" if root else self.mail_user
        self.login_user = "dovenull" if root else self.mail_user

    @classmethod
    def start(cls, workdir: Path, extra_conf: str = "", files: dict[str, str] | None = None) -> "DovecotServer":
        server = cls(workdir, free_port())
        server._prepare(extra_conf, files or {})
        server._spawn()
        return server

    def _prepare(self, extra_conf: str, files: dict[str, str]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            path = self.workdir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            path.chmod(0o755 if text.startswith("#!") else 0o644)
        mail = self.workdir / "mail"
        mail.mkdir(exist_ok=True)
        user = pwd.getpwnam(self.mail_user)
        if os.geteuid() == 0:
            self._traversable()
            os.chown(mail, user.pw_uid, user.pw_gid)
        (self.workdir / "users").write_text(f"{self.USER}:{{PLAIN}}{self.PASSWORD}\n")
        w = self.workdir
        self.conf_path.write_text(f"""\
base_dir = {w}/run
state_dir = {w}/state
log_path = {self.log_path}
protocols = imap
listen = {LOOPBACK}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
default_internal_user = {self.internal_user}
default_login_user = {self.login_user}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {w}/users
}}
userdb {{
  driver = static
  args = uid={user.pw_uid} gid={user.pw_gid} home={w}/mail/%u
}}
mail_location = maildir:{w}/mail/%u/Maildir
namespace inbox {{
  inbox = yes
  mailbox Junk {{
    auto = create
    special_use = \\Junk
  }}
  mailbox Trash {{
    auto = create
    special_use = \\Trash
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = {LOOPBACK}
    port = {self.port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
{extra_conf}
""")

    def _traversable(self) -> None:
        """o+x on the work directory and its parents below /tmp (pytest makes them 0700)."""
        path = self.workdir
        while path != path.parent and path != Path("/tmp"):
            mode = path.stat().st_mode
            if not mode & 0o001:
                path.chmod((mode & 0o7777) | 0o001)
            path = path.parent

    def _spawn(self) -> None:
        with open(self.workdir / "dovecot.err", "wb") as err:
            self.proc = subprocess.Popen(["dovecot", "-F", "-c", str(self.conf_path)], cwd=self.workdir,
                                         stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_until(lambda: self.proc.poll() is not None or port_accepts(self.port), timeout=15,
                       what=f"dovecot on port {self.port}", on_timeout=self.log)
        except SupportError:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise SupportError(f"dovecot exited: {self.log()}")

    def compile_sieve(self, name: str) -> None:
        """sievec on a script of the work directory, as an administrator does for global scripts."""
        subprocess.run(["sievec", "-c", str(self.conf_path), str(self.workdir / name)], check=True,
                       capture_output=True, timeout=30)

    def imap(self) -> imaplib.IMAP4:
        client = imaplib.IMAP4(LOOPBACK, self.port, timeout=30)
        client.login(self.USER, self.PASSWORD)
        return client

    def log(self) -> str:
        text = ""
        for path in (self.log_path, self.workdir / "dovecot.err"):
            try:
                text += path.read_text(errors="replace")[-3000:]
            except OSError:
                pass
        return text

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=10)
            self.proc = None
