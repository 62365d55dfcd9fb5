"""A private Postfix instance on loopback, for end-to-end milter tests.

The instance lives entirely in *workdir*::

    workdir/etc/main.cf, master.cf   config_directory (``postfix -c``)
    workdir/queue/                   queue_directory
    workdir/data/                    data_directory
    workdir/postfix.log              maillog_file (via postlogd)

It listens with smtpd on 127.0.0.1:<free port>, hands every SMTP
connection to ``smtpd_milters`` and relays everything it accepts to
``[127.0.0.1]:relay_port`` (normally a :class:`support.sink.SmtpSink`).
There is no local delivery and no DNS.  The system Postfix
(/etc/postfix, /var/spool/postfix) is never touched.

Postfix must run as root (the master drops privileges to ``mail_owner``
= postfix); the Debian package provides the postfix user and the
postdrop group.

This module does not import pytest, so the benchmark harness can use it::

    pf = PostfixInstance(Path("/tmp/bench/pf"), milter="inet:127.0.0.1:9000",
                         relay_port=sink.port)
    pf.start()
    try:
        result = pf.send(b"Subject: hi\\r\\n\\r\\nbody\\r\\n", "a@example.com", ["b@example.net"])
    finally:
        pf.stop()
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import email.utils
import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from . import (LOOPBACK, SupportError, free_port, pid_alive, read_smtp_greeting,
               session_members, wait_until)

__all__ = ["PostfixInstance", "SendResult", "postfix_available"]

POSTFIX = shutil.which("postfix", path="/usr/sbin:/usr/bin:/sbin:/bin") or "/usr/sbin/postfix"
POSTQUEUE = shutil.which("postqueue", path="/usr/sbin:/usr/bin") or "/usr/sbin/postqueue"
POSTSUPER = shutil.which("postsuper", path="/usr/sbin:/usr/bin") or "/usr/sbin/postsuper"

QUEUED_AS = re.compile(r"queued as ([0-9A-Za-z]+)")


def postfix_available() -> str | None:
    """None if a private Postfix can run here, else the reason it cannot."""
    if not os.path.exists(POSTFIX):
        return "postfix is not installed"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (master drops privileges itself)"
    return None


@dataclass
class SendResult:
    """What the SMTP client saw.

    ``code`` and ``message`` are the reply that decided the outcome: the
    final reply to DATA on success, else the first refusal (greeting,
    MAIL, all RCPTs refused, DATA command or end of data).
    ``rcpt_codes`` maps each recipient to its (code, text) RCPT reply.
    ``stage`` is where the outcome was decided: connect, xclient, helo,
    mail, rcpt, data or disconnect.
    """

    code: int
    message: str
    rcpt_codes: dict[str, tuple[int, str]] = field(default_factory=dict)
    stage: str = "data"
    queue_id: str | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def tempfail(self) -> bool:
        return 400 <= self.code < 500

    @property
    def rejected(self) -> bool:
        return 500 <= self.code < 600

    def __str__(self) -> str:
        return f"{self.code} {self.message} (at {self.stage})"


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


class PostfixInstance:
    """One private Postfix: config, queue and log under *workdir*.

    :param milter: value for ``smtpd_milters`` (e.g. ``inet:127.0.0.1:9000``
        or ``unix:/path/sock``; ``inet:PORT@127.0.0.1`` libmilter notation is
        converted); None for no milter (baseline).
    :param relay_port: where everything is relayed: ``[127.0.0.1]:relay_port``.
    :param smtpd_port: port for smtpd on 127.0.0.1; default a free port.
    :param milter_default_action: accept, reject, tempfail or quarantine.
    :param extra_main_cf: main.cf settings that override the defaults below.
    """

    def __init__(self, workdir: Path | str, *, milter: str | None, relay_port: int,
                 smtpd_port: int | None = None, milter_default_action: str = "tempfail",
                 extra_main_cf: Mapping[str, object] | None = None,
                 myhostname: str = "mx.test.invalid") -> None:
        self.workdir = Path(workdir).resolve()
        self.etc_dir = self.workdir / "etc"
        self.queue_dir = self.workdir / "queue"
        self.data_dir = self.workdir / "data"
        self.log_file = self.workdir / "postfix.log"
        self.milter = milter
        self.relay_port = relay_port
        self._auto_port = not smtpd_port
        self.smtpd_port = smtpd_port or free_port()
        self.host = LOOPBACK
        self.milter_default_action = milter_default_action
        self.extra_main_cf = dict(extra_main_cf or {})
        self.myhostname = myhostname
        self._started = False

    # ------------------------------------------------------------------
    # configuration
    # ------------------------------------------------------------------
    @staticmethod
    def milter_address(socket: str) -> str:
        """Convert libmilter notation (``inet:PORT@HOST``) to Postfix's.

        Postfix wants ``inet:HOST:PORT``; ``unix:PATH`` is the same in both.
        """
        m = re.fullmatch(r"inet:(\d+)(?:@(.+))?", socket)
        if m:
            return f"inet:{m.group(2) or LOOPBACK}:{m.group(1)}"
        if socket.startswith("local:"):
            return "unix:" + socket[len("local:"):]
        return socket

    def main_cf(self) -> dict[str, str]:
        """The main.cf settings, defaults first, then ``extra_main_cf``."""
        milter = self.milter_address(self.milter) if self.milter else ""
        cf: dict[str, object] = {
            "compatibility_level": "3.6",
            # Locations: everything private to this instance.
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir,
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            # Logging to a file through postlogd (service "postlog" below).
            # maillog_file must start with one of maillog_file_prefixes.
            "maillog_file": self.log_file,
            "maillog_file_prefixes": self.workdir,
            "syslog_name": "postfix-test",
            # Identity and network: loopback only, IPv4 only.
            "myhostname": self.myhostname,
            "mydomain": "test.invalid",
            "myorigin": "$myhostname",
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            # No local delivery at all: every domain is relayed.
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:5.1.1 local delivery is disabled",
            "alias_maps": "",
            "alias_database": "",
            # Every domain is a relay domain, so that a client that XCLIENT
            # placed outside mynetworks may still send to any recipient.
            "relay_domains": "static:ALL",
            "relayhost": f"[{LOOPBACK}]:{self.relay_port}",
            "default_transport": "smtp",
            "relay_transport": "relay",
            # No DNS anywhere.
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "lmtp_host_lookup": "native",
            "smtpd_peername_lookup": "yes",  # native (/etc/hosts), not DNS
            "append_dot_mydomain": "no",
            "biff": "no",
            "readme_directory": "no",
            "smtputf8_enable": "yes",
            # Behave like an inbound MX: do not "fix" client headers.
            "local_header_rewrite_clients": "",
            "disable_mime_output_conversion": "yes",
            "smtpd_banner": "$myhostname ESMTP",
            # Access policy: loopback clients may relay; XCLIENT lets a test
            # pretend to be another client (ADDR, NAME, HELO) on loopback.
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_recipient_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_delay_reject": "yes",
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
            "smtpd_error_sleep_time": "0s",
            "smtpd_soft_error_limit": "1000",
            "smtpd_hard_error_limit": "1000",
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
            "smtpd_tls_security_level": "none",
            "smtp_tls_security_level": "none",
            # Quick retries, sane lifetime.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "maximal_queue_lifetime": "1h",
            "bounce_queue_lifetime": "1h",
            "delay_warning_time": "0h",
            "smtp_connect_timeout": "5s",
            # Milter.
            "smtpd_milters": milter,
            "non_smtpd_milters": "",
            "milter_protocol": "6",
            "milter_default_action": self.milter_default_action,
            "milter_connect_macros": "j {daemon_name} {client_addr} {client_name} {if_addr} v _",
            "milter_helo_macros": "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}",
            "milter_mail_macros": "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} {mail_mailer}",
            "milter_rcpt_macros": "i {rcpt_addr} {rcpt_host} {rcpt_mailer}",
            "milter_end_of_header_macros": "i",
            "milter_end_of_data_macros": "i",
            "milter_connect_timeout": "10s",
        }
        cf.update(self.extra_main_cf)
        return {k: _fmt(v) for k, v in cf.items()}

    def master_cf(self) -> str:
        """master.cf: Debian's services, chroot off, smtpd on loopback only."""
        svc = [
            # service     type  private unpriv chroot wakeup maxproc command
            (f"{LOOPBACK}:{self.smtpd_port}", "inet", "n", "-", "n", "-", "-", "smtpd"),
            ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
            ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
            ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
            ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
            ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
            ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
            ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
            ("proxywrite", "unix", "-", "-", "n", "-", "1", "proxymap"),
            ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
            ("error", "unix", "-", "-", "n", "-", "-", "error"),
            ("retry", "unix", "-", "-", "n", "-", "-", "error"),
            ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
            ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
            ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
            ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
        ]
        lines = ["# generated by tests/support/postfix.py"]
        for row in svc:
            lines.append("  ".join(f"{c:<10}" for c in row).rstrip())
        return "\n".join(lines) + "\n"

    def write_config(self) -> None:
        self.etc_dir.mkdir(parents=True, exist_ok=True)
        main = "".join(f"{k} = {v}\n" for k, v in self.main_cf().items())
        (self.etc_dir / "main.cf").write_text("# generated by tests/support/postfix.py\n" + main)
        (self.etc_dir / "master.cf").write_text(self.master_cf())
        # Postfix refuses to trust a config file modified within the last
        # two seconds (it re-reads it every 0.3 s until it is "old enough",
        # costing ~2 s per command).  Backdate the files we just wrote.
        past = time.time() - 10
        for name in ("main.cf", "master.cf"):
            os.utime(self.etc_dir / name, (past, past))

    # ------------------------------------------------------------------
    # running postfix commands
    # ------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["MAIL_CONFIG"] = str(self.etc_dir)
        env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        if "/usr/sbin" not in env["PATH"].split(":"):
            env["PATH"] += ":/usr/sbin:/sbin"
        return env

    def run(self, *argv: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run a Postfix command (``postfix``, ``postqueue``, ...) for this instance.

        ``-c <etc>`` is inserted after the program name.
        """
        prog, *rest = argv
        cmd = [prog, "-c", str(self.etc_dir), *rest]
        proc = subprocess.run(cmd, env=self._env(), capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise SupportError(
                f"{' '.join(cmd)} exited {proc.returncode}\nstdout: {proc.stdout}\n"
                f"stderr: {proc.stderr}\n--- postfix.log tail ---\n{self.log_tail()}")
        return proc

    def postconf(self, *names: str) -> dict[str, str]:
        """Effective values as ``postconf -c etc NAME...`` reports them."""
        out = self.run("postconf", *names).stdout
        return dict(line.split(" = ", 1) if " = " in line else (line.rstrip(" ="), "")
                    for line in out.splitlines() if line.strip())

    # ------------------------------------------------------------------
    # lifecycle
    # ------------------------------------------------------------------
    def _prepare_dirs(self) -> None:
        # The queue directory must be owned by root; the Postfix-owned
        # subdirectories are created by "postfix start" (post-install
        # create-missing).  data_directory belongs to mail_owner.
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.queue_dir.mkdir(exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        os.chmod(self.queue_dir, 0o755)
        os.chown(self.queue_dir, 0, 0)
        import pwd
        pw = pwd.getpwnam("postfix")
        os.chown(self.data_dir, pw.pw_uid, pw.pw_gid)
        os.chmod(self.data_dir, 0o700)
        # Postfix daemons run as "postfix" and postdrop as group postdrop:
        # every parent directory must be searchable by them.  pytest's
        # tmp_path parents are mode 0700, so open them up (x only).
        for parent in [self.workdir, *self.workdir.parents]:
            if parent == Path("/"):
                break
            try:
                st = parent.stat()
            except OSError:
                break
            if st.st_uid == os.geteuid() and not st.st_mode & 0o001:
                os.chmod(parent, (st.st_mode & 0o7777) | 0o011)
        self.log_file.touch(exist_ok=True)

    def start(self, timeout: float = 30.0) -> "PostfixInstance":
        """Write the config, start the master, wait for the 220 greeting."""
        reason = postfix_available()
        if reason:
            raise SupportError(reason)
        self._prepare_dirs()
        for attempt in range(3):
            self.write_config()
            self.run("postfix", "check")
            try:
                self.run("postfix", "start", timeout=timeout)
                break
            except SupportError as e:
                # free_port() is racy: another process may have taken the
                # port between our probe and the master's bind().
                if not (self._auto_port and "Address already in use" in str(e)) or attempt == 2:
                    raise
                self.stop()
                self.smtpd_port = free_port()
        self._started = True

        def ready() -> bool:
            greeting = read_smtp_greeting(self.smtpd_port, self.host, timeout=2.0)
            return bool(greeting and greeting.startswith("220"))

        wait_until(ready, timeout, interval=0.05,
                   what=f"postfix smtpd 220 on {self.host}:{self.smtpd_port}",
                   on_timeout=self.log_tail)
        return self

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def session_pids(self) -> list[int]:
        """PIDs of master and its children (the master is a session leader)."""
        master = self.master_pid()
        if master is None:
            return []
        return session_members(master)

    def is_running(self) -> bool:
        pid = self.master_pid()
        return pid is not None and pid_alive(pid)

    def stop(self, timeout: float = 20.0) -> None:
        """``postfix stop`` and wait until master and children are gone.

        Safe to call twice and after a failed start; falls back to
        ``postfix abort`` and then SIGKILL at the deadline.
        """
        if not self.etc_dir.joinpath("main.cf").exists():
            return
        master = self.master_pid()
        if master is None or not pid_alive(master):
            self._started = False
            return
        pids = self.session_pids() or [master]
        self.run("postfix", "stop", check=False, timeout=timeout)
        try:
            wait_until(lambda: not any(pid_alive(p) for p in pids), timeout,
                       what="postfix master to exit")
        except SupportError:
            self.run("postfix", "abort", check=False)
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            wait_until(lambda: not any(pid_alive(p) for p in pids), 5,
                       what="postfix processes to die after SIGKILL")
        self._started = False

    def reload(self) -> None:
        """Rewrite main.cf/master.cf and ``postfix reload``."""
        self.write_config()
        self.run("postfix", "reload")

    def reconfigure(self, **settings: object) -> None:
        """Change main.cf settings (``milter_default_action="accept"``) and reload."""
        for k, v in settings.items():
            if k == "milter_default_action":
                self.milter_default_action = str(v)
            elif k == "smtpd_milters":
                self.milter = str(v) or None
            else:
                self.extra_main_cf[k] = v
        if self.is_running():
            self.reload()
        else:
            self.write_config()

    def __enter__(self) -> "PostfixInstance":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------
    # SMTP client
    # ------------------------------------------------------------------
    def send(self, msg: bytes | str | email.message.Message,
             sender: str | None = None, rcpts: Iterable[str] | str | None = None, *,
             helo: str = "client.example.org", xclient: Mapping[str, str] | None = None,
             source_address: str | None = None, mail_options: Iterable[str] = (),
             rcpt_options: Iterable[str] = (), timeout: float = 60.0) -> SendResult:
        """Submit *msg* over SMTP to this instance's smtpd.

        *sender* and *rcpts* default to the addresses in the From: and
        To:/Cc: headers.  4xx/5xx replies are returned, never raised.

        *xclient* (``{"ADDR": "192.0.2.1", "NAME": "mail.example.com",
        "HELO": ...}``) makes Postfix (and the milter) see another client
        while the TCP connection stays on loopback.  *source_address* picks
        the local loopback address to connect from (e.g. ``127.0.0.2``).
        """
        data = self._as_bytes(msg)
        if sender is None or rcpts is None:
            h_from, h_rcpts = self._header_addresses(data)
            if sender is None:
                sender = h_from or "sender@example.com"
            if rcpts is None:
                rcpts = h_rcpts or ["rcpt@example.net"]
        if isinstance(rcpts, str):
            rcpts = [rcpts]
        rcpts = list(rcpts)
        smtp = smtplib.SMTP(timeout=timeout, local_hostname=helo,
                            source_address=(source_address, 0) if source_address else None)
        rcpt_codes: dict[str, tuple[int, str]] = {}
        last = (0, "")

        def text(resp) -> str:
            return resp.decode("utf-8", "replace") if isinstance(resp, bytes) else str(resp)

        try:
            code, resp = smtp.connect(self.host, self.smtpd_port)
            last = (code, text(resp))
            if code != 220:
                return SendResult(code, text(resp), stage="connect")
            if xclient:
                code, resp = smtp.ehlo()
                if code != 250:
                    return SendResult(code, text(resp), stage="helo")
                attrs = " ".join(f"{k.upper()}={v}" for k, v in xclient.items())
                code, resp = smtp.docmd("XCLIENT", attrs)
                last = (code, text(resp))
                if code != 220:
                    return SendResult(code, text(resp), stage="xclient")
                smtp.ehlo_resp = smtp.helo_resp = None
                smtp.esmtp_features = {}
            code, resp = smtp.ehlo()
            last = (code, text(resp))
            if code != 250:
                return SendResult(code, text(resp), stage="helo")
            code, resp = smtp.mail(sender, list(mail_options))
            last = (code, text(resp))
            if code != 250:
                return SendResult(code, text(resp), stage="mail")
            for r in rcpts:
                code, resp = smtp.rcpt(r, list(rcpt_options))
                rcpt_codes[r] = (code, text(resp))
                last = (code, text(resp))
            accepted = [r for r, (c, _) in rcpt_codes.items() if c in (250, 251)]
            if not accepted:
                code, resp = next(iter(rcpt_codes.values()))
                return SendResult(code, resp, rcpt_codes, stage="rcpt")
            try:
                code, resp = smtp.data(data)
            except smtplib.SMTPDataError as e:  # DATA command itself refused
                return SendResult(e.smtp_code, text(e.smtp_error), rcpt_codes, stage="data")
            qid = QUEUED_AS.search(text(resp))
            return SendResult(code, text(resp), rcpt_codes, stage="data",
                              queue_id=qid.group(1) if qid else None)
        except smtplib.SMTPServerDisconnected as e:
            code = last[0] if last[0] >= 400 else 421
            return SendResult(code, f"{last[1]} (disconnected: {e})".strip(), rcpt_codes,
                              stage="disconnect")
        except smtplib.SMTPResponseException as e:
            return SendResult(e.smtp_code, text(e.smtp_error), rcpt_codes, stage="disconnect")
        finally:
            try:
                smtp.quit()
            except (smtplib.SMTPException, OSError):
                pass
            smtp.close()

    @staticmethod
    def _as_bytes(msg: bytes | str | email.message.Message) -> bytes:
        if isinstance(msg, bytes):
            return msg
        if isinstance(msg, str):
            return msg.encode("utf-8")
        policy = msg.policy.clone(linesep="\r\n")
        return msg.as_bytes(policy=policy)

    @staticmethod
    def _header_addresses(data: bytes) -> tuple[str | None, list[str]]:
        headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)
        froms = [a for _, a in email.utils.getaddresses(headers.get_all("From", [])) if a]
        to = [a for _, a in email.utils.getaddresses(
            headers.get_all("To", []) + headers.get_all("Cc", [])) if a]
        return (froms[0] if froms else None), to

    # ------------------------------------------------------------------
    # queue
    # ------------------------------------------------------------------
    def queue(self) -> list[dict]:
        """``postqueue -j``: one dict per queued message (all queues)."""
        out = self.run("postqueue", "-j").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def queue_ids(self) -> list[str]:
        return [m["queue_id"] for m in self.queue()]

    def hold_queue(self) -> list[str]:
        """Queue ids of messages on hold (milter quarantine lands here)."""
        return [m["queue_id"] for m in self.queue() if m.get("queue_name") == "hold"]

    def deferred_queue(self) -> list[str]:
        return [m["queue_id"] for m in self.queue() if m.get("queue_name") == "deferred"]

    def flush(self) -> None:
        """``postqueue -f``: retry deferred mail now."""
        self.run("postqueue", "-f")

    def release_hold(self, queue_id: str = "ALL", *, flush: bool = True) -> None:
        """``postsuper -H``; released mail goes to deferred, so flush it too."""
        self.run("postsuper", "-H", queue_id)
        if flush:
            self.flush()

    def delete(self, queue_id: str = "ALL") -> None:
        self.run("postsuper", "-d", queue_id)

    def show(self, queue_id: str) -> str:
        """The queue file as ``postcat -q`` prints it (envelope + content)."""
        return self.run("postcat", "-q", queue_id).stdout

    def wait_for_queue_empty(self, timeout: float = 10.0) -> None:
        wait_until(lambda: not self.queue(), timeout, interval=0.1,
                   what="postfix queue to become empty",
                   on_timeout=lambda: f"queue: {self.queue()}\n{self.log_tail()}")

    # ------------------------------------------------------------------
    # log
    # ------------------------------------------------------------------
    def log_lines(self) -> list[str]:
        try:
            return self.log_file.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_lines()[-n:])

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        """Wait until a log line matches the regex *pattern*; return the match."""
        rx = re.compile(pattern)

        def find():
            for line in self.log_lines():
                m = rx.search(line)
                if m:
                    return m
            return None

        return wait_until(find, timeout, interval=0.1, what=f"postfix log line /{pattern}/",
                          on_timeout=self.log_tail)

    def __repr__(self) -> str:
        return (f"PostfixInstance(smtpd={self.host}:{self.smtpd_port}, "
                f"milter={self.milter!r}, relay_port={self.relay_port})")
