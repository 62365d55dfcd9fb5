"""The metrics' exposition with the real prometheus_client in multiprocess mode: labels,
histogram buckets, figures added up across processes, dependencies, and the dashboard's
queries (docs/metrics.md).  The end-to-end test through Postfix is test_metrics_postfix.py."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest

from milterguard import metrics
from milterguard.clients.outage import Outage
from milterguard.config import load_config
from milterguard.engine.core import Engine
from milterguard.mail.raw import split_message
from milterguard.model import Connection, Transaction
from milterguard.settingtypes import parse_listen_address

DOCS = Path(__file__).resolve().parents[1] / "docs"


def evaluate(engine: Engine, body: str, subject: str = "hello"):
    raw = (f"From: Alice <alice@example.net>\nTo: bob@example.org\nSubject: {subject}\n"
           f"Date: Mon, 02 Sep 2002 10:00:00 +0000\nMessage-ID: <m.{abs(hash(body))}@example.net>\n\n{body}\n").encode()
    headers, payload = split_message(raw)
    conn = Connection(client_ip="192.0.2.10", client_name="mail.example.net", helo="mail.example.net")
    txn = Transaction(mail_from="alice@example.net", rcpts=["bob@example.org"], headers=headers, body=payload,
                      body_size=len(payload))
    return engine.evaluate(conn, txn)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    etc = tmp_path_factory.mktemp("etc")
    return Engine.load(load_config(etc_dir=etc, sets=["dns.enabled=false"]))


@pytest.fixture
def recording(tmp_path):
    """Multiprocess mode in a directory of this test, recording in this process; undone after."""
    from prometheus_client import values

    saved_class, saved_env = values.ValueClass, os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    directory, made = metrics.prepare_directory(str(tmp_path / "metrics"))
    assert not made and (os.stat(directory).st_mode & 0o777) == 0o700
    metrics.enable(directory)
    metrics.start_recording()
    try:
        yield directory
    finally:
        metrics.disable()
        # disable() puts back what enable() changed, for whatever runs next in this process
        assert values.ValueClass is saved_class
        assert os.environ.get("PROMETHEUS_MULTIPROC_DIR") == saved_env


def scrape(directory: str) -> dict:
    """{(sample name, sorted labels): value} of what the supervisor would serve."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.parser import text_string_to_metric_families

    metrics.flush()  # what this process counted, as its flusher would write it
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, metric: str, /, **labels) -> float:
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


def test_a_verdict_gives_its_action_symbols_and_check_times(engine, recording):
    clean = evaluate(engine, "The minutes are in the wiki. MILTERGUARD-CANARY-CLEAN")
    tagged = evaluate(engine, "MILTERGUARD-CANARY-TAG")
    rejected = evaluate(engine, "MILTERGUARD-CANARY-REJECT")
    for verdict in (clean, tagged, rejected, tagged):
        metrics.record_verdict(verdict)
    got = scrape(recording)
    assert value(got, "milterguard_messages_total", action="accept") == 1
    assert value(got, "milterguard_messages_total", action="tag") == 2
    assert value(got, "milterguard_messages_total", action="reject") == 1
    assert value(got, "milterguard_symbol_hits_total", symbol="CANARY_TAG") == 2
    assert value(got, "milterguard_symbol_hits_total", symbol="CANARY_REJECT") == 1
    symbols = {dict(labels)["symbol"] for name, labels in got if name == "milterguard_symbol_hits_total"}
    assert symbols == {h.symbol for v in (clean, tagged, rejected) for h in v.hits}
    # One histogram series per check that ran, with the engine's own names and times.
    ran = {name for v in (clean, tagged, rejected) for name, t in v.timings.items() if t > 0}
    checks = {dict(labels)["check"] for name, labels in got if name == "milterguard_check_duration_seconds_count"}
    assert checks == ran and "parse" in checks
    for check in checks:
        counts = [value(got, "milterguard_check_duration_seconds_bucket", check=check, le=le)
                  for le in [repr(b) for b in metrics.CHECK_BUCKETS] + ["+Inf"]]
        assert counts == sorted(counts), f"{check}: cumulative buckets must not fall: {counts}"
        assert counts[-1] == value(got, "milterguard_check_duration_seconds_count", check=check)
        expected = sum(v.timings.get(check, 0.0) for v in (clean, tagged, rejected, tagged))
        assert value(got, "milterguard_check_duration_seconds_sum", check=check) == pytest.approx(expected)
    assert value(got, "milterguard_scan_duration_seconds_count") == 4
    scan_sum = sum(t for v in (clean, tagged, rejected, tagged) for t in v.timings.values())
    assert value(got, "milterguard_scan_duration_seconds_sum") == pytest.approx(scan_sum)


def test_a_recipient_refused_alone_is_not_a_message(engine, recording):
    verdict = evaluate(engine, "MILTERGUARD-CANARY-CLEAN")
    verdict.rcpt = "blocked@example.org"
    metrics.record_verdict(verdict)
    got = scrape(recording)
    assert value(got, "milterguard_recipients_refused_total") == 1
    assert not any(name == "milterguard_messages_total" and value(got, name, **dict(labels))
                   for name, labels in got)


def test_the_figures_of_two_processes_add_up(engine, recording):
    verdict = evaluate(engine, "MILTERGUARD-CANARY-TAG")
    metrics.session_opened()
    pid = os.fork()
    if pid == 0:  # a second worker: its own files, in the same directory
        code = 1
        try:
            for _ in range(3):
                metrics.record_verdict(verdict)
            metrics.session_opened()
            metrics.session_opened()
            metrics.flush()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    metrics.record_verdict(verdict)
    files = sorted(os.listdir(recording))
    assert any(f"_{pid}.db" in f for f in files) and any(f"_{os.getpid()}.db" in f for f in files)
    got = scrape(recording)
    assert value(got, "milterguard_messages_total", action="tag") == 4
    assert value(got, "milterguard_sessions_in_flight") == 3
    # The worker is gone: its counters stay, its sessions do not (what the supervisor does at its exit).
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid, recording)
    got = scrape(recording)
    assert value(got, "milterguard_messages_total", action="tag") == 4
    assert value(got, "milterguard_sessions_in_flight") == 1


def test_dependencies_up_down_failures_and_skips(recording):
    clamd = Outage("clamd at 127.0.0.1:3310", logging.getLogger("test"), start=60, cap=60)
    assert clamd.kind == "clamd"
    got = scrape(recording)
    assert value(got, "milterguard_dependency_up", dependency="clamd", name=clamd.name) == 1
    clamd.failed("connection refused")
    assert not clamd.usable()  # skipped: within its back-off
    got = scrape(recording)
    assert value(got, "milterguard_dependency_up", dependency="clamd", name=clamd.name) == 0
    assert value(got, "milterguard_dependency_failures_total", dependency="clamd") == 1
    assert value(got, "milterguard_dependency_skipped_total", dependency="clamd") == 1
    clamd.succeeded()
    metrics.dependency("quarantine", "quarantine", False)
    got = scrape(recording)
    assert value(got, "milterguard_dependency_up", dependency="clamd", name=clamd.name) == 1
    assert value(got, "milterguard_dependency_up", dependency="quarantine", name="quarantine") == 0
    assert value(got, "milterguard_dependency_failures_total", dependency="quarantine") == 1


def test_a_failing_record_is_logged_once_and_never_raises(recording, caplog):
    with caplog.at_level(logging.ERROR, logger="milterguard.metrics"):
        metrics.record_verdict(object())
        metrics.record_verdict(object())
    lines = [r for r in caplog.records if "recording a verdict" in r.getMessage()]
    assert len(lines) == 1


def test_errors_count_once_per_answer(recording):
    metrics.record_error("eom")
    metrics.record_error("the quarantine store (disk full)")
    got = scrape(recording)
    assert value(got, "milterguard_messages_total", action="error") == 1
    assert value(got, "milterguard_filter_errors_total", stage="eom") == 1
    assert value(got, "milterguard_filter_errors_total", stage="quarantine") == 1


def test_the_supervisor_records_nothing_until_a_worker_starts(engine, tmp_path):
    """enable() alone (the supervisor, before it forks) makes the metrics but writes no figure."""
    directory, _ = metrics.prepare_directory(str(tmp_path / "metrics"))
    try:
        metrics.enable(directory)
        metrics.record_verdict(evaluate(engine, "MILTERGUARD-CANARY-TAG"))
        metrics.session_opened()
        Outage("clamd at 127.0.0.1:3310", logging.getLogger("test")).failed("refused")
        got = scrape(directory)
        assert value(got, "milterguard_messages_total", action="tag") == 0
        assert value(got, "milterguard_sessions_in_flight") == 0
        assert not any(name.startswith("milterguard_dependency") for name, _labels in got)
    finally:
        metrics.disable()


@pytest.mark.parametrize("text, expected", [("127.0.0.1:11381", ("127.0.0.1", 11381)),
                                            ("[::1]:9", ("::1", 9))])
def test_listen_address(text, expected):
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize("text", ["localhost:11381", "::1:11381", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:x"])
def test_listen_address_refused(text):
    with pytest.raises(ValueError):
        parse_listen_address(text)


def test_a_configured_directory_is_emptied_and_private(tmp_path):
    directory = tmp_path / "m"
    directory.mkdir(mode=0o755)
    (directory / "counter_1.db").write_bytes(b"old")
    (directory / "keep.txt").write_text("not ours")
    path, made = metrics.prepare_directory(str(directory))
    assert not made and sorted(os.listdir(path)) == ["keep.txt"]
    assert (os.stat(path).st_mode & 0o777) == 0o700


EXPORTED_BY_SUPERVISOR = {"milterguard_build_info", "milterguard_start_time_seconds", "milterguard_workers",
                          "milterguard_worker_restarts_total", "milterguard_workers_resident_memory_bytes",
                          "milterguard_workers_cpu_seconds_total", "milterguard_quarantine_messages",
                          "milterguard_quarantine_size_bytes"}


def exported_names() -> set[str]:
    """Every sample name the filter can serve: the workers' metrics and the supervisor's."""
    source = Path(metrics.__file__).read_text()
    names = set(EXPORTED_BY_SUPERVISOR)
    for kind, name in re.findall(r'(Counter|Gauge|Histogram)\("(milterguard_\w+)"', source):
        if kind == "Counter":
            names.add(f"{name}_total")
        elif kind == "Histogram":
            names.update(f"{name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        else:
            names.add(name)
    for name in EXPORTED_BY_SUPERVISOR:
        assert f'"{name.removesuffix("_total")}"' in source, f"{name} is no longer exported"
    return names


def test_the_dashboard_queries_only_exported_metrics():
    dashboard = json.loads((DOCS / "grafana" / "milterguard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 6
    exported = exported_names()
    used = set()
    for expr in exprs:
        found = set(re.findall(r"\bmilterguard_\w+", expr))
        assert found, f"no metric of the filter in {expr!r}"
        assert found <= exported, f"{expr!r} names metrics the filter does not export: {found - exported}"
        used |= found
    for wanted in ("milterguard_messages_total", "milterguard_symbol_hits_total",
                   "milterguard_check_duration_seconds_bucket", "milterguard_dependency_up",
                   "milterguard_sessions_in_flight", "milterguard_quarantine_messages"):
        assert wanted in used, f"the dashboard shows no {wanted}"


def test_the_docs_name_every_metric():
    text = (DOCS / "metrics.md").read_text()
    missing = [name for name in sorted(exported_names())
               if not name.endswith(("_bucket", "_sum", "_count")) and f"`{name}" not in text]
    missing += [name.removesuffix("_bucket") for name in exported_names()
                if name.endswith("_bucket") and f"`{name.removesuffix('_bucket')}" not in text]
    assert not missing, f"docs/metrics.md does not describe: {missing}"


def test_a_fork_waits_for_the_quarantine_poll_but_not_for_ever(caplog):
    exporter = metrics.Exporter({}, list, lambda: 0)
    with exporter.forking():
        assert exporter.fork_gate.locked()  # a poll starting now waits for the fork
    assert not exporter.fork_gate.locked()
    exporter.fork_gate.acquire()  # a poll stuck on a database that stopped answering
    try:
        with caplog.at_level(logging.WARNING, logger="milterguard.metrics"):
            with exporter.forking(wait=0.05):
                pass
        assert "forking a worker meanwhile" in caplog.text
        assert exporter.fork_gate.locked()  # still the poll's
    finally:
        exporter.fork_gate.release()
