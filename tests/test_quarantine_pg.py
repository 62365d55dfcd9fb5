"""The quarantine on PostgreSQL: a cluster the tests start (initdb, pg_ctl, as an
unprivileged user, on a loopback port), shared by two filter nodes behind two
Postfix instances; the store going away and coming back."""

from __future__ import annotations

import json
import time

import pytest

from milterguard.cli import main
from milterguard.stores import quarantine as q
from milterguard.stores.quarantine import AlreadyReleased, Held, Quarantine, Query, QuarantineError
from support import wait_until
from support.postgres import PostgresCluster, postgres_available

from test_quarantine_postfix import RCPTS, SENDER, message


@pytest.fixture(scope="module")
def pg():
    reason = postgres_available()
    if reason:
        pytest.skip(reason)
    cluster = PostgresCluster().start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def store(pg):
    store = Quarantine(pg.url, node="node-a")
    store._run(lambda conn: [conn.execute(table.delete()) for table in
                             (q.bodies, q.symbols, q.recipients, q.events, q.messages)])
    yield store
    store.close()


def held(**kw) -> Held:
    return Held(**{"sender": SENDER, "rcpts": RCPTS, "score": 9.0,
                   "symbols": [{"name": "CANARY_REVIEW", "weight": 9.0, "options": []}], **kw})


def test_the_same_store_on_postgresql(store):
    raw = b"Subject: big\r\n\r\n" + bytes(range(256)) * (20 * 1024 * 1024 // 256)
    ident = store.add(held(), raw)
    assert store.raw(ident) == raw
    assert store.schema_version() == q.SCHEMA_VERSION
    assert [h.id for h in store.list(Query(rcpt="Carol@example.org", symbol="CANARY_REVIEW"))] == [ident]
    assert store.release(ident, lambda *a: [], rcpts=["bob@example.net"], who="admin") == ["bob@example.net"]
    with pytest.raises(AlreadyReleased):
        store.release(ident, lambda *a: [])
    old = store.add(held(received_at=time.time() - 40 * 86400), b"old")
    assert store.expire(30) == (1, 3)
    assert [h.id for h in store.list(Query())] == [ident]
    assert store.get(ident).released["bob@example.net"][1] == "admin"
    with pytest.raises(QuarantineError):
        store.get(old)


@pytest.mark.postfix
def test_two_nodes_share_one_quarantine_and_survive_its_outage(pg, postfix_factory, milterguard_factory, sink, capsys):
    Quarantine(pg.url).close()  # the schema, before the nodes race for it
    nodes = []
    for name in ("node-a", "node-b"):
        mg = milterguard_factory(name=name, workers=1,
                                 sets={"quarantine.url": pg.url, "node.name": name})
        nodes.append((mg, postfix_factory(mg, name=f"postfix-{name}")))
    sent = {}
    for mg, pf in nodes:
        raw, msgid = message("MILTERGUARD-CANARY-REVIEW", subject=f"via {mg.workdir.name}")
        result = pf.send(raw, SENDER, RCPTS)
        assert result.code == 250, result
        sent[result.queue_id] = mg.workdir.name
        assert mg.verdict_for(msgid).action == "review"

    def listed() -> dict:
        capsys.readouterr()
        assert main(["quarantine", "list", "--json", "--set", f"quarantine.url={pg.url}"]) == 0
        return {r["queue_id"]: r["node"] for r in map(json.loads, capsys.readouterr().out.splitlines())}

    wait_until(lambda: set(sent) <= set(listed()) or None, 10, what="both nodes' messages")
    assert {qid: node for qid, node in listed().items() if qid in sent} == sent

    # The database goes away: 451, one line saying why; back, the retry is stored.
    mg, pf = nodes[0]
    pg.stop()
    try:
        raw, msgid = message("MILTERGUARD-CANARY-REVIEW", subject="during the outage")
        result = pf.send(raw, SENDER, RCPTS)
        assert result.code == 451, result
        wait_until(lambda: "failed in the quarantine store" in mg.log_text() or None, 10,
                   what="the store failure line", on_timeout=mg.log_tail)
    finally:
        pg.start()
    result = pf.send(raw, SENDER, RCPTS)
    assert result.code == 250, result
    assert result.queue_id in listed()
    assert not any(m.message_id == msgid for m in sink.messages)
