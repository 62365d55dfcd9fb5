#!/usr/bin/env python3
"""CPU per message of the milter alone, driven over the milter protocol without an MTA.

    python bench/milter_cpu.py [--messages N] [--concurrency C] [--workers W]
                               [--noop] [--set KEY=VALUE ...] [MESSAGE]

`bench/run.py` measures the whole path, Postfix included, and its figures
move by 10 % from one run to the next as Postfix and the milter share the
cores.  This one leaves the MTA out: a small client in this process speaks
the milter protocol (version 6, every no-reply step offered) to
`milterguard serve` as Postfix would, one SMTP session per message, C
sessions at a time, and reads the CPU time the milter's processes spent
from /proc.  DNS is answered by a local nsd authoritative for the sender's
domain, as in `bench/run.py`.  With ``--noop`` it measures the no-op
pymilter milter instead, for the floor.  Everything listens on 127.0.0.1
or a unix socket; every loop is bounded.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import os
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))
sys.path.insert(0, str(BENCH))

from procmem import cpu_seconds  # noqa: E402
from support.milterguard_proc import MilterguardProcess  # noqa: E402
from support.noop_milter import NoopMilterProcess  # noqa: E402

CORPUS = Path(os.environ.get("MILTERGUARD_CORPUS", "/work/shared/corpus"))
DEFAULT_MESSAGE = CORPUS / "spamassassin/spam/00009.027bf6e0b0c4ab34db3ce0ea4bf2edab.eml"

# Protocol steps that may go without a reply (SMFIP_NR_*), and what we offer.
NR = {"C": 0x1000, "H": 0x2000, "M": 0x4000, "R": 0x8000, "T": 0x10000, "L": 0x80, "N": 0x40000, "B": 0x80000}
OFFER_PROTOCOL = 0x1FFFFF
OFFER_ACTIONS = 0x1FF
FINAL = {b"a", b"c", b"r", b"t", b"d", b"y"}  # replies that end a step


class MilterClient:
    """One SMTP session's worth of milter protocol, as an MTA speaks it."""

    def __init__(self, spec: str) -> None:
        if spec.startswith("unix:"):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(spec[5:])
        else:
            port, _, host = spec[5:].partition("@")
            self.sock = socket.create_connection((host, int(port)))
        self.protocol = 0
        self.buf = b""

    def send(self, cmd: bytes, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">I", len(data) + 1) + cmd + data)

    def read(self) -> tuple[bytes, bytes]:
        while len(self.buf) < 4 or len(self.buf) < 4 + struct.unpack(">I", self.buf[:4])[0]:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("milter closed the connection")
            self.buf += chunk
        n = struct.unpack(">I", self.buf[:4])[0]
        packet, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
        return packet[:1], packet[1:]

    def step(self, cmd: str, data: bytes = b"") -> bytes | None:
        self.send(cmd.encode(), data)
        if self.protocol & NR.get(cmd, 0):
            return None
        while True:
            code, _ = self.read()
            if code in FINAL:
                return code

    def negotiate(self) -> None:
        self.send(b"O", struct.pack(">III", 6, OFFER_ACTIONS, OFFER_PROTOCOL))
        code, data = self.read()
        if code != b"O":
            raise ConnectionError(f"negotiation answered {code!r}")
        _version, _actions, self.protocol = struct.unpack(">III", data[:12])

    def macro(self, stage: str, **values: str) -> None:
        payload = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in values.items())
        self.send(b"D", stage.encode() + payload)

    def close(self) -> None:
        try:
            self.send(b"Q")
        finally:
            self.sock.close()


def session(spec: str, n: int, sender: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    c = MilterClient(spec)
    try:
        c.negotiate()
        c.macro("C", j="mx.bench.invalid", **{"{daemon_name}": "smtpd", "{client_addr}": "192.0.2.25"})
        c.step("C", b"client.bench.invalid\0" + b"4" + struct.pack(">H", 25000) + b"192.0.2.25\0")
        c.step("H", b"client.bench.invalid\0")
        c.macro("M", i=f"Q{n:08X}", **{"{mail_addr}": sender})
        c.step("M", f"<{sender}>\0".encode())
        c.macro("R", **{"{rcpt_addr}": "user@example.net"})
        c.step("R", b"<user@example.net>\0")
        c.step("T")
        for name, value in headers:
            c.step("L", name.encode() + b"\0" + value.encode("utf-8", "surrogateescape") + b"\0")
        c.step("N")
        for i in range(0, len(body), 65535):
            c.step("B", body[i:i + 65535])
        c.macro("E", i=f"Q{n:08X}")
        return c.step("E") or b""
    finally:
        c.close()


def load_message(path: Path) -> tuple[str, list[tuple[str, str]], bytes]:
    raw = path.read_bytes().replace(b"\r\n", b"\n")
    if raw.startswith(b"From "):
        raw = raw.split(b"\n", 1)[1]
    head, _, body = raw.partition(b"\n\n")
    msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head + b"\n\n")
    headers = []
    for name, value in msg.raw_items():
        headers.append((name, str(value).lstrip(" \t")))
    sender = next((v for n, v in headers if n.lower() == "return-path"), "<sender@example.com>").strip().strip("<>")
    return sender or "sender@example.com", headers, body.replace(b"\n", b"\r\n")


def run(spec: str, pids, messages: int, concurrency: int, sender, headers, body) -> dict:
    counter = iter(range(messages))
    lock = threading.Lock()
    answers: dict[bytes, int] = {}
    errors: list[str] = []

    def client() -> None:
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            try:
                code = session(spec, n, sender, headers, body)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(str(exc))
                continue
            with lock:
                answers[code] = answers.get(code, 0) + 1

    cpu0 = sum(cpu_seconds(p) for p in pids())
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    wall = time.perf_counter() - t0
    cpu = sum(cpu_seconds(p) for p in pids()) - cpu0
    done = sum(answers.values())
    return {"messages": done, "errors": len(errors), "first_error": errors[0] if errors else "",
            "answers": {k.decode(): v for k, v in answers.items()}, "seconds": round(wall, 2),
            "msg_per_s": round(done / wall, 1), "cpu_ms_per_msg": round(1000 * cpu / max(1, done), 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("message", nargs="?", type=Path, default=DEFAULT_MESSAGE)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--noop", action="store_true", help="measure the no-op pymilter milter instead")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    sender, headers, body = load_message(args.message)
    root = Path(tempfile.mkdtemp(prefix="mgcpu-", dir="/tmp"))
    spec = f"unix:{root / 'milter.sock'}"
    dns = None
    if args.noop:
        proc = NoopMilterProcess(root / "noop", socket=spec, verbose=False)
        proc.start()
        pids = lambda: [proc.proc.pid]  # noqa: E731
    else:
        from support.dns import NsdServer, Zone

        dns = NsdServer(root / "nsd", [Zone(sender.rpartition("@")[2] + ".")]).start()
        sets = {"actions.mode": "tag-only", "dns.nameservers": [dns.address]}
        for item in args.set:
            key, _, value = item.partition("=")
            sets[key] = value
        proc = MilterguardProcess(root / "mg", socket=spec, workers=args.workers, sets=sets)
        proc.start()
        pids = lambda: [proc.proc.pid, *session_children(proc.proc.pid)]  # noqa: E731
    try:
        run(spec, pids, min(200, args.messages), args.concurrency, sender, headers, body)  # warm-up
        results = [run(spec, pids, args.messages, args.concurrency, sender, headers, body)
                   for _ in range(args.rounds)]
    finally:
        proc.stop()
        if dns is not None:
            dns.stop()
    for r in results:
        print(r)
    cpu = sorted(r["cpu_ms_per_msg"] for r in results)
    rate = sorted(r["msg_per_s"] for r in results)
    print(f"{'noop' if args.noop else 'milterguard'}: median {cpu[len(cpu) // 2]} ms CPU/msg, "
          f"{rate[len(rate) // 2]} msg/s at concurrency {args.concurrency}")
    return 0


def session_children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


if __name__ == "__main__":
    sys.exit(main())
