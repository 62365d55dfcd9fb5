"""The quarantine store on a real SQLite file: storing, search, release records,
expiry, the schema version, and the modes of its files."""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest

from milterguard.stores import quarantine as q
from milterguard.stores.quarantine import AlreadyReleased, Held, NotFound, Quarantine, Query, QuarantineError


def held(**kw) -> Held:
    base = dict(sender="alice@example.com", rcpts=["bob@example.net", "carol@example.org"], client_ip="192.0.2.7",
                helo="mail.example.com", queue_id="4XyZ1abc", subject="cheap pills", from_header="Alice <alice@example.com>",
                score=9.5, symbols=[{"name": "CANARY_REVIEW", "weight": 9.5, "options": ["x"]}], explain="CANARY_REVIEW +9.50")
    base.update(kw)
    return Held(**base)


@pytest.fixture
def store(tmp_path):
    store = Quarantine(f"sqlite:///{tmp_path}/qdir/quarantine.db", node="node-a")
    yield store
    store.close()


def test_a_message_round_trips_with_its_envelope(store):
    raw = b"Subject: cheap pills\r\nX-Spam-Flag: YES\r\n\r\nbody\r\n"
    ident = store.add(held(), raw)
    assert len(ident) == q.ID_LENGTH and set(ident) <= set(q.ID_ALPHABET)
    got = store.get(ident)
    assert got.sender == "alice@example.com" and got.rcpts == ["bob@example.net", "carol@example.org"]
    assert (got.client_ip, got.helo, got.queue_id, got.node) == ("192.0.2.7", "mail.example.com", "4XyZ1abc", "node-a")
    assert got.symbols == [{"name": "CANARY_REVIEW", "weight": 9.5, "options": ["x"]}]
    assert got.size == len(raw) and store.raw(ident) == raw
    with pytest.raises(NotFound):
        store.get("nosuchid22")


def test_twenty_megabytes_round_trip_byte_for_byte(store):
    raw = b"Subject: big\r\n\r\n" + bytes(range(256)) * (20 * 1024 * 1024 // 256)
    ident = store.add(held(), raw)
    assert store.raw(ident) == raw


def test_the_files_are_readable_by_the_owner_alone(tmp_path):
    path = tmp_path / "private" / "q.db"
    store = Quarantine(f"sqlite:///{path}")
    store.add(held(), b"Subject: x\r\n\r\ny\r\n")
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    for name in os.listdir(path.parent):  # the database and SQLite's -wal and -shm files
        assert stat.S_IMODE(os.stat(path.parent / name).st_mode) == 0o600, name
    store.close()


def test_search_by_recipient_sender_symbol_score_and_time(store):
    now = time.time()
    a = store.add(held(rcpts=["Bob@Example.net"], received_at=now - 3 * 86400), b"a")
    b = store.add(held(sender="eve@example.com", from_header="Eve <eve@example.com>", score=20,
                       symbols=[{"name": "OTHER", "weight": 20, "options": []}]), b"b")
    assert [h.id for h in store.list(Query(rcpt="bob@example.NET"))] == [b, a]
    assert [h.id for h in store.list(Query(rcpt="carol@example.org"))] == [b]
    assert [h.id for h in store.list(Query(sender="eve@example.com"))] == [b]
    assert [h.id for h in store.list(Query(symbol="canary_review"))] == [a]
    assert [h.id for h in store.list(Query(min_score=10))] == [b]
    assert [h.id for h in store.list(Query(since=now - 86400))] == [b]
    assert [h.id for h in store.list(Query(limit=1))] == [b]


def test_a_release_is_recorded_and_not_repeated_without_force(store):
    ident = store.add(held(), b"m")
    sent = []
    send = lambda h, raw, rcpts: sent.append(rcpts) or []  # noqa: E731
    assert store.release(ident, send, rcpts=["carol@example.org"], who="admin") == ["carol@example.org"]
    with pytest.raises(AlreadyReleased):
        store.release(ident, send, rcpts=["carol@example.org"])
    assert store.release(ident, send, rcpts=["bob@example.net"], who="admin") == ["bob@example.net"]
    assert sent == [["carol@example.org"], ["bob@example.net"]]
    assert store.get(ident).released["carol@example.org"][1] == "admin"


def test_release_of_all_refuses_when_one_was_released(store):
    ident = store.add(held(), b"m")
    store.release(ident, lambda *a: [], rcpts=["bob@example.net"], who="admin")
    with pytest.raises(AlreadyReleased):
        store.release(ident, lambda *a: [])
    assert store.release(ident, lambda *a: [], force=True, who="root") == ["bob@example.net", "carol@example.org"]
    got = store.get(ident)
    assert set(got.released) == {"bob@example.net", "carol@example.org"}
    assert [e["kind"] for e in store.events(ident)] == ["release", "release"]


def test_a_failed_send_takes_the_release_mark_back(store):
    ident = store.add(held(), b"m")

    def refused_send(h, raw, rcpts):
        raise OSError("connection refused")

    with pytest.raises(OSError):
        store.release(ident, refused_send)
    assert store.get(ident).released == {}
    assert store.release(ident, lambda *a: []) == ["bob@example.net", "carol@example.org"]


def test_recipients_the_server_refused_stay_unreleased(store):
    ident = store.add(held(), b"m")
    assert store.release(ident, lambda h, raw, rcpts: ["carol@example.org"]) == ["bob@example.net"]
    assert set(store.get(ident).released) == {"bob@example.net"}
    assert store.release(ident, lambda *a: [], rcpts=["carol@example.org"]) == ["carol@example.org"]


def test_delete_removes_everything_of_the_message(store):
    ident = store.add(held(), b"m")
    store.delete(ident, who="admin")
    with pytest.raises(NotFound):
        store.raw(ident)
    assert store.list(Query()) == []
    assert [e["kind"] for e in store.events(ident)] == ["delete"]
    with pytest.raises(NotFound):
        store.delete(ident)


def test_expiry_removes_only_what_is_past_retention(store, caplog):
    now = time.time()
    old = store.add(held(received_at=now - 31 * 86400), b"o" * 10)
    young = store.add(held(received_at=now - 29 * 86400), b"y" * 10)
    with caplog.at_level("INFO", logger="milterguard.quarantine"):
        assert store.expire(30) == (1, 10)
    assert [h.id for h in store.list(Query())] == [young]
    assert old not in caplog.text and "removed 1 messages" in caplog.text


def test_the_size_cap_removes_the_oldest_first(store):
    now = time.time()
    ids = [store.add(held(received_at=now - i), b"x" * 100) for i in (5, 4, 3, 2, 1)]
    assert store.expire(30, max_size=250) == (3, 300)
    assert [h.id for h in store.list(Query())] == [ids[4], ids[3]]


def test_the_schema_is_versioned_and_opened_again_unchanged(tmp_path):
    url = f"sqlite:///{tmp_path}/q.db"
    first = Quarantine(url)
    ident = first.add(held(), b"m")
    assert first.schema_version() == q.SCHEMA_VERSION
    first.close()
    again = Quarantine(url)
    assert again.get(ident).sender == "alice@example.com"
    again.close()


def test_a_schema_newer_than_the_code_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path}/q.db"
    store = Quarantine(url)
    store._run(lambda conn: conn.execute(q.update(q.schema_version).values(version=q.SCHEMA_VERSION + 1)))
    store.close()
    with pytest.raises(QuarantineError, match="newer"):
        Quarantine(url)


def test_a_store_that_cannot_be_opened_raises_its_own_error(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(QuarantineError):
        Quarantine(f"sqlite:///{tmp_path}/afile/q.db")
    with pytest.raises(QuarantineError):
        Quarantine("mysql://localhost/q")


def test_processes_and_threads_opening_the_store_at_once_keep_it_sound(tmp_path):
    # As the filter's workers do: two processes, eight threads each, every thread opening
    # the store at the moment the others write, and a reader (the CLI) besides.  Opening
    # used to close a descriptor of the database, which dropped the process's SQLite locks:
    # "database disk image is malformed", disk I/O errors, and workers killed by SIGBUS.
    url = f"sqlite:///{tmp_path}/qdir/quarantine.db"
    Quarantine(url).close()
    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports by its exit status
            status = 1
            try:
                failures = []

                def work() -> None:
                    try:
                        store = Quarantine(url)
                        for _ in range(25):
                            store.add(held(), b"Subject: x\r\n\r\n" + b"y" * 4000)
                    except QuarantineError as exc:
                        failures.append(exc)

                threads = [threading.Thread(target=work) for _ in range(8)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                status = 1 if failures else 0
            finally:
                os._exit(status)
        children.append(pid)
    pending, statuses, deadline = set(children), [], time.monotonic() + 120
    while pending and time.monotonic() < deadline:
        reader = Quarantine(url)
        reader.stats()
        reader.close()
        for pid in list(pending):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                pending.discard(pid)
                statuses.append(status)
    for pid in pending:  # pragma: no cover - only when the writers hang
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert statuses == [0, 0]
    store = Quarantine(url)
    assert store.stats()["messages"] == 2 * 8 * 25
    assert store._run(lambda conn: conn.exec_driver_sql("PRAGMA integrity_check").scalar()) == "ok"
    store.close()


@pytest.mark.slow
def test_listing_100000_messages_by_recipient_is_quick(store):
    now = time.time()
    many = [held(id=f"m{i:09d}", received_at=now - i, rcpts=["all@example.net", f"u{i % 1000}@example.org"])
            for i in range(100_000)]
    store._run(lambda conn: (
        conn.execute(q.insert(q.messages), [q._message_row(h) for h in many]),
        conn.execute(q.insert(q.recipients), [q._rcpt_row(h, r) for h in many for r in h.rcpts]),
        conn.execute(q.insert(q.symbols), [{"message_id": h.id, "symbol": "CANARY_REVIEW", "received_at": h.received_at}
                                           for h in many])))
    for query in (Query(rcpt="all@example.net"), Query(rcpt="u7@example.org"),
                  Query(rcpt="all@example.net", symbol="CANARY_REVIEW", limit=1000)):
        started = time.perf_counter()
        found = store.list(query)
        elapsed = time.perf_counter() - started
        assert found and found[0].id == ("m000000007" if query.rcpt.startswith("u7") else "m000000000")
        print(f"{query.rcpt} {query.symbol} limit {query.limit}: {len(found)} in {elapsed * 1000:.0f} ms")
        assert elapsed < 0.5, f"{query}: {elapsed:.3f}s"
