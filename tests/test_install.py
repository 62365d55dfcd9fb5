"""debian/install.sh, the README's first command, run for real on this machine.

The script installs the Debian package built from this checkout (the
`debian_package` fixture builds it once per run; the script builds it
itself when given none) and starts the filter in the background as its own
user, as it does on a machine without systemd.  The tests then talk to the
installed filter with miltertest, run the script a second time (an upgrade
must keep the operator's files and restart the filter), refuse a broken
configuration, and purge the package at the end.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from support import (  # noqa: E402
    LOOPBACK,
    MILTERTEST,
    REPO_ROOT,
    free_port,
    log_tail,
    pid_alive,
    read_log,
    run_miltertest,
    session_members,
    socket_accepts,
    wait_until,
)
from support.milterguard_proc import parse_verdicts  # noqa: E402
from support.package import purge  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.package,
    pytest.mark.skipif(os.geteuid() != 0, reason="debian/install.sh runs as root"),
]

SCRIPT = REPO_ROOT / "debian" / "install.sh"
INSTALL_TIMEOUT = 900
PREFIX = Path("/usr/lib/milterguard")
ETC = Path("/etc/milterguard")
SHARE = Path("/usr/share/milterguard")
RUN_DIR = Path("/run/milterguard")
LOG_FILE = Path("/var/log/milterguard/milterguard.log")

MILTERTEST_SCRIPT = r"""
-- One session against the installed filter: a message with the reject canary.
dofile(testdir .. "/lib.lua")
main(function()
  local conn = open_conn()
  mt.macro(conn, SMFIC_CONNECT, "j", "mx.test.invalid", "{daemon_name}", "smtpd")
  step(conn, "conninfo", SMFIR_CONTINUE, mt.conninfo, "client.example.org", "198.51.100.7")
  step(conn, "helo", SMFIR_CONTINUE, mt.helo, "client.example.org")
  mt.macro(conn, SMFIC_MAIL, "i", queue_id)
  step(conn, "mailfrom", SMFIR_CONTINUE, mt.mailfrom, "<sender@example.com>")
  step(conn, "rcptto", SMFIR_CONTINUE, mt.rcptto, "<rcpt@example.net>")
  step(conn, "header From", SMFIR_CONTINUE, mt.header, "From", "Sender <sender@example.com>")
  step(conn, "header Subject", SMFIR_CONTINUE, mt.header, "Subject", "install test")
  step(conn, "header Message-ID", SMFIR_CONTINUE, mt.header, "Message-ID", "<" .. queue_id .. "@example.com>")
  step(conn, "eoh", SMFIR_CONTINUE, mt.eoh)
  step(conn, "body", SMFIR_CONTINUE, mt.bodystring, "Hello.\r\nMILTERGUARD-CANARY-REJECT\r\n")
  ok("eom", mt.eom(conn))
  mt.echo("eom reply " .. reply_name(mt.getreply(conn)))
  ok("disconnect", mt.disconnect(conn))
end)
"""


class Installed:
    """install.sh run with the package, and the filter it started."""

    def __init__(self, deb: Path) -> None:
        self.deb = deb
        self.socket = f"inet:{free_port()}@{LOOPBACK}"
        self.results: list[subprocess.CompletedProcess] = []

    @property
    def pid_file(self) -> Path:
        return RUN_DIR / "milterguard.pid"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MILTERGUARD_", "PYTHON"))}
        env.update(MILTERGUARD_DEB=str(self.deb), MILTERGUARD_SOCKET=self.socket, MILTERGUARD_NO_SYSTEMD="1")
        return env

    def run_script(self) -> subprocess.CompletedProcess:
        done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
                              cwd="/", env=self.env(), stdin=subprocess.DEVNULL)
        self.results.append(done)
        return done

    def install(self) -> subprocess.CompletedProcess:
        done = self.run_script()
        assert done.returncode == 0, f"install.sh failed ({done.returncode})\n{done.stdout}\n{done.stderr}\n{self.log_tail()}"
        return done

    def pid(self) -> int:
        return int(self.pid_file.read_text().strip())

    def log_text(self) -> str:
        return read_log(LOG_FILE)

    def log_tail(self, n: int = 40) -> str:
        return "--- milterguard.log ---\n" + log_tail(LOG_FILE, n)

    def stop(self) -> None:
        """SIGTERM to the pid in the pid file; bounded wait; SIGKILL what is left of its session."""
        if not self.pid_file.exists():
            return
        try:
            pid = self.pid()
        except ValueError:
            return
        if pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 40
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
        for member in session_members(pid):  # setsid made the daemon its session's leader
            try:
                os.kill(member, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def installed(debian_package):
    inst = Installed(debian_package)
    try:
        inst.install()
        yield inst
    finally:
        inst.stop()
        purge()


def test_install_puts_everything_in_place(installed):
    inst = installed
    out = inst.results[0].stdout
    assert f"listening on {inst.socket}" in out
    port = inst.socket.split(":")[1].split("@")[0]
    assert f"smtpd_milters = inet:{LOOPBACK}:{port}" in out
    bin_ = PREFIX / "bin" / "milterguard"
    assert os.access(bin_, os.X_OK)
    assert Path("/usr/sbin/milterguard").resolve() == bin_.resolve()
    for name in ("core.yaml", "headers.yaml", "body.yaml"):
        assert (SHARE / "rules" / name).read_bytes() == (REPO_ROOT / "rules" / name).read_bytes()
    assert (SHARE / "rules" / "maps" / "freemail.map").is_file()
    assert (SHARE / "conf" / "milterguard.yaml").read_bytes() == (REPO_ROOT / "conf" / "milterguard.yaml").read_bytes()
    for sub in ("local.d", "override.d", "rules.d", "maps"):
        assert (ETC / sub).is_dir()
    assert (ETC / "local.d" / "local.yaml").read_text().startswith("# Local settings")
    # The package's own environment, not this checkout.
    site = subprocess.run([str(PREFIX / "bin" / "python"), "-I", "-c", "import milterguard; print(milterguard.__file__)"],
                          capture_output=True, text=True, check=True, timeout=60, cwd="/").stdout.strip()
    assert site.startswith(str(PREFIX)), site


def test_installed_command_reads_installed_files(installed):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MILTERGUARD_", "PYTHON"))}
    done = subprocess.run(["/usr/sbin/milterguard", "config", "dump", "--origin"], capture_output=True,
                          text=True, timeout=60, env=env, cwd="/")
    assert done.returncode == 0, done.stderr
    socket_line = next(line for line in done.stdout.splitlines() if line.startswith("milter.socket:"))
    assert "share/milterguard/conf/milterguard.yaml" in socket_line and str(REPO_ROOT) not in socket_line
    done = subprocess.run(["/usr/sbin/milterguard", "lint"], capture_output=True, text=True, timeout=60,
                          env=env, cwd="/")
    assert done.returncode == 0, done.stdout + done.stderr
    assert ", 0 errors, " in done.stderr


def test_daemon_runs_in_background_as_its_own_user(installed):
    inst = installed
    pid = inst.pid()
    assert pid_alive(pid)
    assert os.getsid(pid) == pid, "the daemon should lead its own session (setsid)"
    uid = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("Uid:"))
    assert pwd.getpwuid(uid).pw_name == "milterguard"
    assert socket_accepts(inst.socket)
    log = inst.log_text()
    assert f"milterguard listening on {inst.socket}" in log
    # The default configuration needs nothing else running, and says what is off and why.
    assert "no Redis configured (redis.url)" in log
    assert "ClamAV off: no clamd configured (clamav.address)" in log


@pytest.mark.skipif(not os.path.exists(MILTERTEST), reason="miltertest is not installed (tests/run.sh installs it)")
def test_installed_filter_rejects_the_canary(installed, tmp_path):
    inst = installed
    script = tmp_path / "canary.lua"
    script.write_text(MILTERTEST_SCRIPT)
    done = run_miltertest(script, inst.socket, queue_id="INSTALLTEST1")
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{inst.log_tail()}"
    assert "eom reply REPLYCODE" in done.stdout, done.stdout + inst.log_tail()
    verdict = wait_until(
        lambda: next((v for v in parse_verdicts(inst.log_text()) if v.get("queue_id") == "INSTALLTEST1"), None),
        10, what="the verdict line", on_timeout=inst.log_tail)
    assert verdict["action"] == "reject"
    assert "CANARY_REJECT" in verdict.symbols


def test_second_run_keeps_operator_files_and_restarts(installed):
    inst = installed
    local = ETC / "local.d" / "local.yaml"
    local.write_text(local.read_text() + "log: {level: debug}\n")
    mine = ETC / "rules.d" / "site.yaml"
    mine.write_text("[]\n")
    old_pid = inst.pid()
    inst.install()
    assert local.read_text().endswith("log: {level: debug}\n")
    assert mine.read_text() == "[]\n"
    new_pid = inst.pid()
    assert new_pid != old_pid
    assert not pid_alive(old_pid)
    assert pid_alive(new_pid)
    assert socket_accepts(inst.socket)
    assert f"stopping the running filter (pid {old_pid})" in inst.results[-1].stdout


def test_broken_configuration_is_refused_and_the_filter_keeps_running(installed):
    inst = installed
    pid = inst.pid()
    bad = ETC / "local.d" / "zz-broken.yaml"
    bad.write_text("actions:\n  mdoe: shadow\n")
    try:
        done = inst.run_script()
    finally:
        bad.unlink()
    assert done.returncode != 0
    assert "zz-broken.yaml:2" in done.stderr
    assert pid_alive(pid) and inst.pid() == pid
    assert socket_accepts(inst.socket)


def test_the_suite_runs_in_a_virtual_environment():
    """tests/run.sh installs the package and its test extras into .venv/, made with Debian's
    python3, and runs pytest from there: a stock Debian 12 refuses `pip install` into the
    system's Python (PEP 668), and a second `milterguard` on PATH would shadow the installed
    filter's."""
    assert sys.prefix != sys.base_prefix, f"pytest runs in the system's Python {sys.prefix}"
    assert Path(sys.executable).parent == Path(sys.prefix) / "bin"
