"""An authoritative DNS server for the tests: Debian's nsd on loopback.

:class:`NsdServer` writes zone files and an nsd.conf into a work dir and
runs ``nsd -d`` (not daemonised) on 127.0.0.1 and a free port, answering
for the zones it was given; it is ready once it answers a SOA query.
:class:`Zone` builds a zone from (name, type, data) records.

:class:`silent_dns_server` is the fault: a UDP and TCP socket bound on
loopback that nobody reads, so that every query to it goes unanswered.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import textwrap
from pathlib import Path

from support import LOOPBACK, SupportError, stop_process, wait_until

NSD = shutil.which("nsd") or "/usr/sbin/nsd"


def nsd_available() -> str | None:
    """None when nsd can run here, else why not (for pytest.skip)."""
    return None if Path(NSD).exists() else "nsd is not installed (tests/run.sh installs it)"


def txt_data(text: str) -> str:
    """A TXT record's data in zone-file syntax: split in 255-octet strings, quoted."""
    raw = text.replace("\\", "\\\\").replace('"', '\\"')
    chunks = [raw[i:i + 200] for i in range(0, len(raw), 200)] or [""]
    return " ".join(f'"{c}"' for c in chunks)


class Zone:
    """A zone: its origin and records, written out in zone-file syntax."""

    def __init__(self, origin: str, ttl: int = 300, negative_ttl: int = 60) -> None:
        self.origin = origin.rstrip(".").lower()
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.records: list[tuple[str, str, str, int | None]] = []

    def add(self, name: str, rtype: str, data: str, ttl: int | None = None) -> "Zone":
        """NAME relative to the origin ("@" for the origin itself) or absolute with a dot."""
        if rtype.upper() == "TXT" and not data.startswith('"'):
            data = txt_data(data)
        self.records.append((name, rtype.upper(), data, ttl))
        return self

    def txt(self, name: str, text: str, ttl: int | None = None) -> "Zone":
        return self.add(name, "TXT", text, ttl)

    def text(self) -> str:
        lines = [
            f"$ORIGIN {self.origin}.",
            f"$TTL {self.ttl}",
            f"@ IN SOA ns.{self.origin}. hostmaster.{self.origin}. 1 3600 600 86400 {self.negative_ttl}",
            f"@ IN NS ns.{self.origin}.",
            f"ns IN A {LOOPBACK}",
        ]
        for name, rtype, data, ttl in self.records:
            lines.append(f"{name} {ttl if ttl is not None else ''} IN {rtype} {data}".replace("  ", " "))
        return "\n".join(lines) + "\n"


class NsdServer:
    """nsd serving ZONES on 127.0.0.1:<free port>, in WORKDIR."""

    ready_timeout = 20.0

    def __init__(self, workdir: Path | str, zones: list[Zone]) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.zones = list(zones)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_file = self.workdir / "nsd.log"

    @property
    def address(self) -> str:
        """The server in `dns.nameservers` notation."""
        return f"{LOOPBACK}:{self.port}"

    def _write(self) -> Path:
        zone_conf = []
        for zone in self.zones:
            path = self.workdir / f"{zone.origin}.zone"
            path.write_text(zone.text())
            zone_conf.append(f"zone:\n    name: \"{zone.origin}\"\n    zonefile: \"{path}\"\n")
        conf = self.workdir / "nsd.conf"
        conf.write_text(textwrap.dedent(f"""\
            server:
                ip-address: {LOOPBACK}@{self.port}
                port: {self.port}
                username: ""
                chroot: ""
                zonesdir: "{self.workdir}"
                database: ""
                zonelistfile: "{self.workdir}/zone.list"
                xfrdfile: "{self.workdir}/xfrd.state"
                xfrdir: "{self.workdir}"
                pidfile: "{self.workdir}/nsd.pid"
                logfile: "{self.log_file}"
                server-count: 1
                verbosity: 1
                hide-version: yes
                reuseport: no
                rrl-ratelimit: 0
            remote-control:
                control-enable: no
            """) + "".join(zone_conf))
        return conf

    def _answers(self) -> bool:
        import dns.exception
        import dns.message
        import dns.query

        if self.proc is not None and self.proc.poll() is not None:
            raise SupportError(f"nsd exited with {self.proc.returncode}\n{self.log_tail()}")
        query = dns.message.make_query(self.zones[0].origin, "SOA")
        try:
            reply = dns.query.udp(query, LOOPBACK, port=self.port, timeout=0.3)
        except (OSError, EOFError, dns.exception.DNSException):
            return False
        return bool(reply.answer)

    def start(self, port: int | None = None) -> "NsdServer":
        """Start on a free port, or on PORT (a restart keeps its address)."""
        from support import free_port

        for attempt in range(1 if port else 3):
            self.port = port or free_port()
            conf = self._write()
            check = subprocess.run(["nsd-checkconf", str(conf)], capture_output=True, text=True)
            if check.returncode != 0:
                raise SupportError(f"nsd.conf rejected: {check.stderr or check.stdout}")
            with open(self.workdir / "nsd.out", "ab") as out:
                self.proc = subprocess.Popen([NSD, "-d", "-c", str(conf)], stdin=subprocess.DEVNULL,
                                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                wait_until(self._answers, self.ready_timeout, what=f"nsd on port {self.port}", on_timeout=self.log_tail)
                return self
            except SupportError:
                self.stop()
                if port or attempt == 2 or "already in use" not in self.log_tail():
                    raise
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, timeout=10)

    def restart(self) -> "NsdServer":
        """Start again on the same address, after a stop."""
        self.stop()
        return self.start(self.port)

    def log_tail(self, n: int = 40) -> str:
        texts = []
        for path in (self.log_file, self.workdir / "nsd.out"):
            if path.exists():
                texts.append("\n".join(path.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(texts)

    def __enter__(self) -> "NsdServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class silent_dns_server:
    """A name server that never answers: UDP and TCP sockets on loopback that nobody reads.

    Use as a context manager; ``.address`` is its `dns.nameservers` notation.
    """

    def __init__(self) -> None:
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((LOOPBACK, 0))
        self.port = self.udp.getsockname()[1]
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.tcp.bind((LOOPBACK, self.port))
            self.tcp.listen(16)
        except OSError:
            self.tcp.close()
            self.tcp = None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def close(self) -> None:
        self.udp.close()
        if self.tcp is not None:
            self.tcp.close()

    def __enter__(self) -> "silent_dns_server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
