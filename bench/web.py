#!/usr/bin/env python3
"""How long the web console's pages take to answer with a large history.

    python bench/web.py [--rows 100000] [--held 2000] [--requests 20] [--url sqlite:///...|postgresql://...]
                        [--out FILE.json]

Fills a fresh quarantine database (SQLite in a temporary directory, unless --url
names another) with ROWS history rows spread over the last seven days (each with
two to six symbols of forty, actions in a mail server's proportions) and HELD
quarantined messages, starts `milterguard web` on a loopback port, logs in, and
asks each page REQUESTS times over HTTP (httpx), after one request to warm it up.
Prints the median, 95th percentile and worst time of each page, from the request
sent to the last byte received.  Everything stays on 127.0.0.1.
See docs/web.md for the results.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from support.web import ConsoleProcess, add_user  # noqa: E402

from milterguard.stores.history import History, row  # noqa: E402
from milterguard.stores.quarantine import Held, Quarantine  # noqa: E402

ACTIONS = ["accept"] * 70 + ["tag"] * 8 + ["review"] * 4 + ["reject"] * 16 + ["tempfail"] * 2
SYMBOLS = [f"BENCH_SYMBOL_{i:02d}" for i in range(40)] + ["CANARY_REVIEW", "BAYES_SPAM", "SUBJ_SHOUTING"]


def fill(url: str, rows: int, held: int, seed: int = 1) -> tuple[int, str]:
    """Fill the database; returns (a history row id, a held message id)."""
    rnd = random.Random(seed)
    store = Quarantine(url, node="bench-node")
    history = History(store.engine)
    now = time.time()
    started = time.monotonic()
    batch = []
    for i in range(rows):
        at = now - rnd.random() * 7 * 86400
        names = rnd.sample(SYMBOLS, rnd.randint(2, 6))
        batch.append(row(at=at, node=f"mx{i % 3}", queue_id=f"4Q{i:08X}", client_ip=f"192.0.2.{i % 250}",
                         client_name=f"host{i % 997}.example.net", sender=f"sender{i % 5000}@example.com",
                         rcpts=[f"user{i % 300}@example.org"], subject=f"message number {i} about {rnd.random():.6f}",
                         score=round(rnd.uniform(-5, 25), 2), action=rnd.choice(ACTIONS),
                         symbols=[{"name": n, "weight": 1.0, "options": []} for n in names],
                         explain="BENCH_SYMBOL_00  +1.00  bench ...\n" * 12))
        if len(batch) == 1000:
            history.add_many(batch)
            batch = []
    history.add_many(batch)
    filled = time.monotonic() - started
    raw = b"From: <a@example.com>\r\nSubject: held\r\nContent-Type: text/html\r\n\r\n<p>held <b>mail</b></p>\r\n"
    ident = ""
    for i in range(held):
        ident = store.add(Held(sender=f"sender{i}@example.com", rcpts=[f"user{i % 300}@example.org"],
                               subject=f"held message {i}", score=8.0, received_at=now - i * 60,
                               symbols=[{"name": "CANARY_REVIEW", "weight": 0.0, "options": []}],
                               explain="CANARY_REVIEW ..."), raw)
    print(f"filled {rows} history rows in {filled:.1f}s and {held} held messages", file=sys.stderr)
    one = history.search(limit=1)[0]["id"]
    store.close()
    return one, ident


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--held", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--url", default="")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    import httpx

    with tempfile.TemporaryDirectory(prefix="mg-bench-web-") as tmp:
        root = Path(tmp)
        url = args.url or f"sqlite:///{root}/q/quarantine.db"
        history_id, held_id = fill(url, args.rows, args.held)
        (root / "etc").mkdir()
        sets = {"quarantine.url": url, "dns.enabled": "false", "lists.dir": str(root / "lists")}
        add_user(root / "etc", sets, "bench", "admin", "bench password 1")
        console = ConsoleProcess(root / "web", root / "etc", sets).start()
        try:
            client = httpx.Client(base_url=console.url, timeout=60)
            token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
            assert client.post("/login", data={"name": "bench", "password": "bench password 1",
                                               "csrf": token}).status_code in (200, 303)
            pages = ["/overview?range=hour", "/overview?range=day", "/overview?range=week", "/history",
                     "/history?q=sender4242@example.com", "/history?q=no-such-text-anywhere",
                     "/history?action=review", "/history?symbol=BENCH_SYMBOL_07", f"/history/{history_id}",
                     "/quarantine", "/quarantine?rcpt=user7@example.org", f"/quarantine/{held_id}",
                     f"/quarantine/{held_id}/preview", "/symbols", "/lists", "/audit"]
            results = {}
            for path in pages:
                response = client.get(path)
                assert response.status_code == 200, (path, response.status_code, response.text[:300])
                times = []
                for _ in range(args.requests):
                    started = time.perf_counter()
                    response = client.get(path)
                    times.append((time.perf_counter() - started) * 1000)
                    assert response.status_code == 200
                times.sort()
                results[path] = {"median_ms": round(statistics.median(times), 1),
                                 "p95_ms": round(times[max(0, int(len(times) * 0.95) - 1)], 1),
                                 "max_ms": round(times[-1], 1), "bytes": len(response.content)}
                print(f"{path:<45} median {results[path]['median_ms']:7.1f} ms  p95 {results[path]['p95_ms']:7.1f} ms"
                      f"  max {results[path]['max_ms']:7.1f} ms  {results[path]['bytes']:>7} bytes")
        finally:
            console.stop()
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": args.rows, "held": args.held, "requests": args.requests,
                                              "backend": url.split(":")[0], "pages": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
