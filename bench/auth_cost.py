"""What DKIM and ARC cost per message, in CPU time, for one or more source trees, interleaved.

Not a test: run it by hand after touching checks/dkim.py, arc.py or authshared.py,
and compare with the figures in docs/performance.md ("DKIM and ARC cost").

    python bench/auth_cost.py [--messages 60] [--rounds 3] [--relaxed-body] [TREE ...]

Builds the benchmark's full configuration for authentication (bench/full.py: one
nsd on loopback with an SPF record, a DMARC record and two 2048-bit keys), signs
and seals MESSAGES bodies of the SpamAssassin ham with them, then for each round
runs every TREE (a checkout of milterguard; default: this one) in a process of
its own over the same messages: every stage through the engine, as `milterguard
scan` runs it, with the engine's per-check timings taken with the process's CPU
clock instead of the wall clock (the machine may be loaded; waiting on nsd is
not counted).  The DKIM signature is relaxed/simple as in bench/full.py, or
relaxed/relaxed with --relaxed-body (the body form the ARC-Message-Signature
uses too, as most signers do).  Prints, per tree and round, the median CPU milliseconds of the
dkim and arc checks and of the whole scan.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DOMAIN = "sender.bench.test"


def worker(nameserver: str, message_dir: Path, passes: int) -> dict:
    """In the tree on sys.path: scan every message PASSES times; medians in ms."""
    import types

    import milterguard.engine.core as core
    from milterguard.config import load_config
    from milterguard.engine.core import Engine
    from milterguard.mail.raw import split_message
    from milterguard.model import Connection, Transaction

    core.time = types.SimpleNamespace(perf_counter=time.process_time, monotonic=time.monotonic, time=time.time)
    with tempfile.TemporaryDirectory() as etc:
        engine = Engine.load(load_config(etc_dir=Path(etc), sets=[f"dns.nameservers={nameserver}"]), strict=True)
    raws = [p.read_bytes() for p in sorted(message_dir.iterdir())]
    out: dict[str, list[float]] = {"dkim": [], "arc": [], "scan": []}
    symbols: set[str] = set()
    for n in range(passes + 1):
        for raw in raws:
            headers, body = split_message(raw)
            conn = Connection(client_ip="127.0.0.1", client_name="localhost", helo="probe.bench.invalid", macros={})
            txn = Transaction(mail_from=f"a@{DOMAIN}", rcpts=["bob@dest.test"], headers=headers, body=body,
                              body_size=len(body))
            t0 = time.process_time()
            verdict = engine.evaluate(conn, txn)
            spent = time.process_time() - t0
            if n == 0:  # the first pass fills the resolver's cache and the key caches
                symbols.update(s for s in verdict.symbols if s.startswith(("R_DKIM_", "ARC_")))
                continue
            out["scan"].append(spent)
            for check in ("dkim", "arc"):
                out[check].append(verdict.timings.get(check, 0.0))
    result = {k: round(statistics.median(v) * 1000, 3) for k, v in out.items()}
    result["symbols"] = sorted(symbols)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", default=[str(REPO)])
    parser.add_argument("--messages", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--passes", type=int, default=3, help="scans of each message per round")
    parser.add_argument("--relaxed-body", action="store_true", help="DKIM-sign with relaxed/relaxed")
    parser.add_argument("--worker", nargs=2, metavar=("NAMESERVER", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], Path(args.worker[1]), args.passes)))
        return 0

    sys.path.insert(0, str(BENCH))
    sys.path.insert(0, str(REPO / "tests"))
    import full
    from support import corpus_dir
    from support.authmail import message

    hams = sorted((corpus_dir() / "spamassassin/ham").iterdir())[:args.messages]
    zones, dkim_key, arc_key = full.auth_zones(DOMAIN)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        mail = work / "mail"
        mail.mkdir()
        for i, path in enumerate(hams):
            body = path.read_bytes().replace(b"\r\n", b"\n").partition(b"\n\n")[2].decode("latin-1")
            raw = message(from_addr=f"a@{DOMAIN}", subject=f"Note {i}", body=body.replace("\n", "\r\n"))
            if args.relaxed_body:
                import dkim
                raw = dkim.sign(raw, full.DKIM_SELECTOR.encode(), DOMAIN.encode(), dkim_key.pem,
                                canonicalize=(b"relaxed", b"relaxed"),
                                include_headers=[b"from", b"to", b"subject", b"date", b"message-id"]) + raw
                raw = full.arc_seal(raw, full.ARC_DOMAIN, full.ARC_SELECTOR, arc_key,
                                    f"dkim=pass header.d={DOMAIN}").replace(b"\r\n", b"\n")
            else:
                raw = full.signed_message(raw, DOMAIN, dkim_key, arc_key)
            (mail / f"{i:04d}.eml").write_bytes(raw)
        with full.NsdServer(work / "nsd", zones) as nsd:
            for rnd in range(args.rounds):
                for tree in args.trees:
                    env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()))
                    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--passes", str(args.passes),
                                           "--worker", nsd.address, str(mail)],
                                          capture_output=True, text=True, env=env, cwd=tree, timeout=900)
                    if proc.returncode != 0:
                        print(f"{tree}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                        return 1
                    print(f"round {rnd + 1} {tree}: {proc.stdout.strip()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
