"""/metrics scraped while mail streams through a real Postfix to milterguard with two workers:
the counters add up to the messages sent, across workers and across a worker killed and
replaced; and with the default configuration nothing listens but the milter."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import threading
import urllib.request
import uuid

import pytest

from support import free_port, wait_until

pytestmark = pytest.mark.postfix

BODIES = {"accept": "The minutes are in the wiki. MILTERGUARD-CANARY-CLEAN", "tag": "MILTERGUARD-CANARY-TAG",
          "reject": "MILTERGUARD-CANARY-REJECT", "review": "MILTERGUARD-CANARY-REVIEW"}
_SAMPLE = re.compile(r'^(\w+)(?:\{(.*)\})? (\S+)$')


def message(body: str) -> tuple[bytes, str]:
    msgid = f"{uuid.uuid4().hex}@example.com"
    return (f"From: Alice <alice@example.com>\r\nTo: Bob <bob@example.net>\r\nSubject: metrics\r\n"
            f"Date: Mon, 02 Jan 2023 10:00:00 +0000\r\nMessage-ID: <{msgid}>\r\n\r\n{body}\r\n").encode(), msgid


def scrape(port: int) -> dict:
    """{(name, label text): value} of one GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    found = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            found[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return found


def counted(port: int, total: int, log_tail) -> dict:
    """A scrape once TOTAL messages are counted (the counters are written as each verdict is)."""
    def ready():
        samples = scrape(port)
        return samples if sum(by_action(samples).values()) >= total else None

    return wait_until(ready, 15, what=f"{total} messages counted", on_timeout=log_tail)


def by_action(samples: dict) -> dict[str, float]:
    return {re.search(r'action="(\w+)"', labels).group(1): v for (name, labels), v in samples.items()
            if name == "milterguard_messages_total" and v}


def send_all(pf, plan: list[str]) -> dict[str, int]:
    """Send one message per entry of PLAN (an action's canary), four at a time; codes by action."""
    def one(action: str) -> tuple[str, int]:
        raw, _msgid = message(BODIES[action])
        return action, pf.send(raw).code

    codes: dict[str, int] = {}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for action, code in pool.map(one, plan):
            assert code == (550 if action == "reject" else 250), (action, code)
            codes[action] = codes.get(action, 0) + 1
    return codes


def worker_of(line: str) -> str:
    return re.search(r"milterguard\[(\d+)\]", line).group(1)


@pytest.fixture
def metrics_port():
    return free_port()


@pytest.fixture
def mg(milterguard_factory, metrics_port, tmp_path):
    return milterguard_factory(workers=2, sets={"metrics.listen": f"127.0.0.1:{metrics_port}",
                                                "metrics.directory": str(tmp_path / "metrics"),
                                                "metrics.quarantine_interval": "0.2"})


def test_counters_add_up_across_workers_and_a_killed_worker(postfix_factory, mg, metrics_port, sink):
    pf = postfix_factory(mg)
    plan = ["accept"] * 24 + ["tag"] * 12 + ["reject"] * 8 + ["review"] * 4
    scrapes: list[dict] = []
    stop = threading.Event()

    def scraper() -> None:
        while not stop.wait(0.05):
            scrapes.append(scrape(metrics_port))

    thread = threading.Thread(target=scraper)
    thread.start()
    try:
        sent = send_all(pf, plan)
    finally:
        stop.set()
        thread.join(10)
    assert len(scrapes) >= 3
    totals = [sum(by_action(s).values()) for s in scrapes]
    assert totals == sorted(totals), "a counter went down during the stream"
    got = counted(metrics_port, len(plan), mg.log_tail)
    assert by_action(got) == sent
    # Both workers took mail, and the verdict log agrees with the counters.
    verdicts = mg.verdicts()
    assert len({worker_of(v.line) for v in verdicts}) == 2
    assert {a: sum(1 for v in verdicts if v.action == a) for a in sent} == sent
    assert got[("milterguard_symbol_hits_total", 'symbol="CANARY_TAG"')] == sent["tag"]
    assert got[("milterguard_check_duration_seconds_count", 'check="parse"')] == len(plan)
    assert got[("milterguard_sessions_in_flight", "")] == 0
    assert got[("milterguard_workers", "")] == 2
    # Read every 0.2 s here: a read made while the stream was on may show fewer.
    wait_until(lambda: scrape(metrics_port).get(("milterguard_quarantine_messages", "")) == sent["review"],
               10, what=f"the quarantine's size at {sent['review']}", on_timeout=mg.log_tail)
    assert got[("milterguard_dependency_up", 'dependency="quarantine",name="quarantine"')] == 1

    # A worker killed while idle: what it counted stays, and its replacement counts on.
    cpu_before = scrape(metrics_port)[("milterguard_workers_cpu_seconds_total", "")]
    assert cpu_before > 0
    victim = mg.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(mg.worker_pids()) == 2 and victim not in mg.worker_pids(), 15,
               what="the worker replaced", on_timeout=mg.log_tail)
    more = send_all(pf, ["accept"] * 10 + ["tag"] * 4)
    want = {a: sent.get(a, 0) + more.get(a, 0) for a in set(sent) | set(more)}
    after = counted(metrics_port, sum(want.values()), mg.log_tail)
    assert by_action(after) == want
    assert after[("milterguard_worker_restarts_total", "")] == 1
    assert after[("milterguard_workers_cpu_seconds_total", "")] >= cpu_before  # the dead worker's time kept
    assert after[("milterguard_workers", "")] == 2
    assert after[("milterguard_sessions_in_flight", "")] == 0
    # The killed worker's files stay (its counters); its live gauges are gone.
    files = os.listdir(mg.workdir.parent / "metrics")
    assert any(f.startswith("counter_") and f.endswith(f"_{victim}.db") for f in files)
    assert not any(f.startswith("gauge_live") and f.endswith(f"_{victim}.db") for f in files)


def listening_ports(pid: int) -> set[int]:
    """TCP ports a process listens on: its sockets' inodes matched in /proc/net/tcp and tcp6."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as fh:
            next(fh)
            for row in fh:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_metrics_are_off_by_default_and_nothing_else_listens(milterguard_factory):
    mg = milterguard_factory(workers=2)
    wait_until(lambda: len(mg.worker_pids()) == 2, 10, what="two workers")
    for pid in [mg.pid, *mg.worker_pids()]:
        assert listening_ports(pid) == {mg.port}, f"process {pid} listens on more than the milter socket"
    assert "metrics on" not in mg.log_text()


def test_a_port_in_use_leaves_the_mail_flowing(postfix_factory, milterguard_factory, sink):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        mg = milterguard_factory(workers=1, sets={"metrics.listen": f"127.0.0.1:{taken.getsockname()[1]}"})
        pf = postfix_factory(mg)
        raw, msgid = message(BODIES["tag"])
        assert pf.send(raw).code == 250
        assert mg.verdict_for(msgid).action == "tag"
        assert re.search(r"ERROR metrics off: cannot serve them on 127\.0\.0\.1:\d+", mg.log_text())
    finally:
        taken.close()


def test_a_filter_failure_counts_once_as_an_error(postfix_factory, milterguard_factory, metrics_port, sink,
                                                  tmp_path):
    # A spool directory removed under the running filter: every body past spool_bytes fails to
    # spool (body), and the filter answers at end of message by actions.on_error.
    spool = tmp_path / "spool"
    spool.mkdir()
    mg = milterguard_factory(workers=1, sets={"message.spool_bytes": "1K", "message.spool_dir": str(spool),
                                              "metrics.listen": f"127.0.0.1:{metrics_port}"})
    spool.rmdir()
    pf = postfix_factory(mg)
    line = "All work and no play makes a dull message.\r\n"
    raw, _msgid = message("MILTERGUARD-CANARY-CLEAN\r\n" + line * 500)
    assert pf.send(raw).code == 451
    small, _ = message(BODIES["accept"])
    assert pf.send(small).code == 250
    got = counted(metrics_port, 2, mg.log_tail)
    assert by_action(got) == {"error": 1, "accept": 1}
    assert got[("milterguard_filter_errors_total", 'stage="body"')] == 1


def test_a_redis_outage_shows_as_down_failing_and_back(postfix_factory, milterguard_factory, metrics_port, sink,
                                                        tmp_path):
    from support.redis import RedisServer, redis_available

    if not redis_available():
        pytest.skip("redis-server is not installed")
    server = RedisServer.start(tmp_path / "redis")
    try:
        mg = milterguard_factory(workers=1, config_text=f"redis: {{url: '{server.url}', retry_max: 1}}\n",
                                 sets={"metrics.listen": f"127.0.0.1:{metrics_port}"})
        pf = postfix_factory(mg)

        def redis_up() -> float | None:
            found = [v for (name, labels), v in scrape(metrics_port).items()
                     if name == "milterguard_dependency_up" and 'dependency="redis"' in labels]
            return found[0] if found else None

        def failures() -> float:
            return scrape(metrics_port).get(("milterguard_dependency_failures_total", 'dependency="redis"'), 0.0)

        assert pf.send(message(BODIES["accept"])[0]).code == 250
        assert redis_up() == 1 and failures() == 0
        server.kill()
        assert pf.send(message(BODIES["accept"])[0]).code == 250  # Bayes reports its tempfail symbol
        assert redis_up() == 0
        assert failures() >= 1
        server.restart()

        def back() -> bool:
            pf.send(message(BODIES["accept"])[0])  # the next call after the back-off finds it again
            return redis_up() == 1

        wait_until(back, 20, interval=0.5, what="Redis up again in the metrics", on_timeout=mg.log_tail)
        assert re.search(r"Redis .* back after", mg.log_text())
    finally:
        server.stop()
