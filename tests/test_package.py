"""The Debian package, as an administrator meets it.

Built from a clean copy of the tree with dpkg-buildpackage, checked by
lintian, installed with apt on this machine, started as its own user and
used through a real Postfix, upgraded to a rebuilt package whose conffile
changed (the administrator's edit is kept), removed (configuration and data
stay) and purged (they go).  The machine has no systemd: the test starts the
filter as the unit's ExecStart would, and checks that the units are in place.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from support import LOOPBACK, free_port, socket_accepts, stop_process, wait_until
from support.package import installed_version, purge, run
from support.qrmail import LURE, TEXT, message_with_pdf, message_with_png, pdf, qr_paths

pytestmark = [pytest.mark.package, pytest.mark.slow]

PREFIX = Path("/usr/lib/milterguard")
ETC = Path("/etc/milterguard")
CONFFILE = ETC / "local.d" / "local.yaml"


def rebuilt(deb: Path, workdir: Path, version: str, conffile_text: str) -> Path:
    """DEB as a newer version whose shipped conffile says CONFFILE_TEXT."""
    tree = workdir / "upgrade"
    run("dpkg-deb", "-R", str(deb), str(tree))
    control = tree / "DEBIAN" / "control"
    control.write_text(re.sub(r"(?m)^Version: .*$", f"Version: {version}", control.read_text()))
    shipped = tree / str(CONFFILE).lstrip("/")
    shipped.write_text(conffile_text)
    md5 = subprocess.run(["md5sum", str(CONFFILE).lstrip("/")], cwd=tree, capture_output=True, text=True).stdout
    sums = tree / "DEBIAN" / "md5sums"
    lines = [line for line in sums.read_text().splitlines() if not line.endswith(str(CONFFILE).lstrip("/"))]
    sums.write_text("\n".join(lines + [md5.strip()]) + "\n")
    out = workdir / f"milterguard_{version}_upgrade.deb"
    run("dpkg-deb", "--root-owner-group", "-b", str(tree), str(out))
    return out


def apt_install(deb: Path) -> None:
    run("apt-get", "install", "-y", "-q", "--allow-downgrades", "-o", "Dpkg::Options::=--force-confold", str(deb))


class Filter:
    """The installed filter started as the unit starts it: its own user, its own files."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.socket = f"inet:{self.port}@{LOOPBACK}"
        self.log = workdir / "filter.log"
        self.proc = None

    def __enter__(self) -> "Filter":
        log = self.log.open("ab")
        os.chmod(self.log, 0o666)
        self.proc = subprocess.Popen(
            ["setpriv", "--reuid=milterguard", "--regid=milterguard", "--init-groups",
             "/usr/sbin/milterguard", "serve", "--socket", self.socket, "--workers", "1",
             "--set", "dns.enabled=false"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd="/", start_new_session=True,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})
        wait_until(lambda: socket_accepts(self.socket) or (self.proc.poll() is not None and
                                                           pytest.fail(self.log.read_text()[-3000:])),
                   30, what="the installed filter to listen")
        return self

    def __exit__(self, *exc) -> None:
        stop_process(self.proc, timeout=20)


@pytest.fixture(scope="module")
def package(debian_package, tmp_path_factory):
    yield tmp_path_factory.mktemp("package"), debian_package
    purge()


def test_lintian_finds_no_error(package):
    _workdir, deb = package
    out = run("lintian", "--tag-display-limit", "0", str(deb), check=False, timeout=600)
    errors = [line for line in out.stdout.splitlines() if line.startswith("E:")]
    assert not errors, "\n".join(errors)


def test_install_use_upgrade_remove_purge(package, postfix_factory, sink):
    workdir, deb = package
    apt_install(deb)
    assert installed_version()
    # What the package put in place.
    assert os.access(PREFIX / "bin" / "milterguard", os.X_OK)
    assert Path("/usr/sbin/milterguard").resolve() == PREFIX / "bin" / "milterguard"
    assert (Path("/lib/systemd/system/milterguard.service")).is_file()
    assert (Path("/lib/systemd/system/milterguard-daily.timer")).is_file()
    assert run("getent", "passwd", "milterguard").stdout.split(":")[6].strip() == "/usr/sbin/nologin"
    assert oct(ETC.stat().st_mode & 0o777) == "0o750" and CONFFILE.is_file()
    assert oct(Path("/var/lib/milterguard").stat().st_mode & 0o777) == "0o750"
    lint = run("/usr/sbin/milterguard", "lint")
    assert "error" not in lint.stdout.lower()
    assert run("/usr/sbin/milterguard", "--version").stdout.startswith("milterguard ")

    # The package's dependencies bring the QR decoder (libzbar0) and the PDF renderer (poppler-utils):
    # a QR code in a PNG and one drawn as paths in a PDF are read by the installed filter.
    for kind, raw in (("png", message_with_png()), ("pdf", message_with_pdf(pdf([TEXT + qr_paths(LURE)])))):
        mail = workdir / f"qr-{kind}.eml"
        mail.write_bytes(raw)
        scanned = run("/usr/sbin/milterguard", "scan", "--explain", "--set", "dns.enabled=false", str(mail))
        assert "QR_CODE_URL" in scanned.stdout, (kind, scanned.stdout[-3000:])
        assert "not found" not in scanned.stderr, (kind, scanned.stderr[-3000:])

    # It filters mail through a real Postfix, started as the unit starts it.
    with Filter(workdir) as flt:
        pf = postfix_factory(flt.socket)
        msgid = f"{uuid.uuid4().hex}@example.com"
        raw = (f"From: a@example.com\r\nTo: b@example.net\r\nSubject: package\r\nMessage-ID: <{msgid}>\r\n"
               "Date: Mon, 07 Dec 2026 10:00:00 +0000\r\n\r\nMILTERGUARD-CANARY-TAG\r\n").encode()
        assert pf.send(raw).code == 250
        got = sink.wait_for_message_id(f"<{msgid}>", timeout=30)
        assert "action=tag" in got.header("X-Spam-Status")

    # An upgrade keeps the administrator's edit of a conffile the new package changed.
    CONFFILE.write_text(CONFFILE.read_text() + "\nthresholds: {reject: 12}\n")
    upgrade = rebuilt(deb, workdir, installed_version() + "+1", "# the new shipped example\n")
    apt_install(upgrade)
    assert installed_version().endswith("+1")
    assert "thresholds: {reject: 12}" in CONFFILE.read_text()
    assert Path(str(CONFFILE) + ".dpkg-dist").read_text() == "# the new shipped example\n"
    assert "12.0" in run("/usr/sbin/milterguard", "config", "dump").stdout

    # Remove: the program goes, configuration and data stay.
    Path("/var/lib/milterguard/kept").write_text("data\n")
    run("apt-get", "remove", "-y", "-q", "milterguard")
    assert not (PREFIX / "bin" / "milterguard").exists() and not Path("/usr/sbin/milterguard").exists()
    assert CONFFILE.is_file() and Path("/var/lib/milterguard/kept").is_file()

    # Purge: they go too.
    run("apt-get", "purge", "-y", "-q", "milterguard")
    assert not ETC.exists() and not Path("/var/lib/milterguard").exists()
    assert not installed_version()
