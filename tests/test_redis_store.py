"""milterguard.clients.redis_client against real redis-server processes: replicas, outages, Sentinel failover."""

from __future__ import annotations

import logging
import time

import pytest

from milterguard.config import load_config
from milterguard.engine.core import Engine
from milterguard.stores.bayes import Bayes
from milterguard.mail.message import Message
from milterguard.clients.redis_client import RedisReadOnly, RedisStore, RedisUnavailable, get_store
from support import wait_until
from support.authmail import engine_for, message, scan
from support.mailgen import make_message
from support.redis import RedisSentinel, redis_available
from support.redis_fixtures import master, replica  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server and redis-sentinel are not installed")


def test_off_without_servers_and_prefixed_keys(tmp_path):
    assert RedisStore.from_config(load_config(etc_dir=tmp_path)) is None
    assert get_store(load_config(etc_dir=tmp_path)) is None
    store = RedisStore.from_config(load_config(etc_dir=tmp_path, sets=["redis.url=redis://127.0.0.1:1/0",
                                                                      "redis.prefix=site-a:"]))
    assert store.key("bayes", "t", 7) == "site-a:bayes:t:7"


def test_writes_go_to_the_master_and_reads_to_the_replica(master, replica):
    store = RedisStore(url=master.url, replicas=[replica.url])
    store.writer().set(store.key("k"), "v")
    master.wait_replicated(replica)
    reader = store.reader()
    assert reader.name == replica.url
    assert reader.get(store.key("k")) == b"v"
    with store.writer().pipeline() as pipe:
        pipe.incr(store.key("n")).incr(store.key("n"))
        assert pipe.execute() == [1, 2]
    # A node that only knows the replica never writes.
    replica_only = RedisStore(replicas=[replica.url])
    assert replica_only.reader().get(store.key("k")) == b"v"
    with pytest.raises(RedisReadOnly):
        replica_only.writer()
    # Nor does a node told to be read-only.
    with pytest.raises(RedisReadOnly):
        RedisStore(url=master.url, read_only=True).writer()


def test_a_dead_replica_falls_back_to_the_master(master, replica, caplog):
    store = RedisStore(url=master.url, replicas=[replica.url], timeout=0.5)
    store.writer().set(store.key("k"), "v")
    replica.kill()
    with caplog.at_level(logging.WARNING, logger="milterguard.redis"):
        for _ in range(5):
            assert store.reader().get(store.key("k")) == b"v"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and f"Redis {replica.url} not reachable" in lines[0], lines
    assert lines[0].endswith(f"using {master.url}"), lines


def test_outage_is_logged_once_calls_fail_fast_and_recovery_follows(master, caplog):
    store = RedisStore(url=master.url, timeout=0.5, retry_max=0.3)
    store.writer().set(store.key("k"), "v")
    master.stop()
    with caplog.at_level(logging.INFO, logger="milterguard.redis"):
        started = time.monotonic()
        failures = 0
        while time.monotonic() - started < 1.5:
            with pytest.raises(RedisUnavailable):
                store.reader().get(store.key("k"))
            failures += 1
            time.sleep(0.02)
        assert failures > 20  # the back-off answers at once: no time lost per message
        down = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(down) == 1, [r.getMessage() for r in caplog.records]
        assert "retrying every 0.3s at most" in down[0].getMessage()
        master.restart()  # same port, empty (no persistence)
        wait_until(lambda: _answers(store), timeout=5, what="reconnect after restart")
        up = [r for r in caplog.records if "back after" in r.getMessage()]
        assert len(up) == 1


def test_a_connection_closed_under_a_sent_command_is_asked_again_of_the_same_server(master, caplog):
    """Sentinel kills a replica's clients when it promotes it: a command sent before and read
    after gets its answer from that server on a new connection, and the server is not counted
    down (a master-only store would otherwise have nothing left to ask)."""
    store = RedisStore(url=master.url, timeout=0.5, retry_max=5)
    key = store.key("queue")
    with caplog.at_level(logging.INFO, logger="milterguard.redis"):
        pending = store.reader().send("BLPOP", key, "0.4")  # no reply until an element comes
        # Every client but this one is closed, the BLPOP above with its connection, unanswered.
        assert master.client().client_kill_filter(_type="normal") >= 1
        master.client().rpush(key, "v")
        assert list(pending.result()) == [key.encode(), b"v"]
        assert store.reader().get(key) is None  # the server was not put to back off
    assert _redis_lines(caplog) == []


def _answers(store: RedisStore) -> bool:
    try:
        store.writer().set(store.key("k"), "again")
        return True
    except RedisUnavailable:
        return False


def test_start_with_redis_down_logs_once(tmp_path, caplog):
    config = load_config(etc_dir=tmp_path, sets=["redis.url=redis://127.0.0.1:9/0", "redis.prefix=down-test:"])
    with caplog.at_level(logging.WARNING, logger="milterguard.redis"):
        Engine.load(config)  # the engine asks Redis when it loads, before any message
        assert len(caplog.records) == 1
        store = get_store(config)
        assert get_store(config) is store  # cached per process
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "redis://127.0.0.1:9/0 unavailable: ConnectionError" in lines[0]


@pytest.mark.slow
def test_sentinel_failover_keeps_classifying_and_learning_resumes(tmp_path, master, replica):
    sentinel = RedisSentinel.start(tmp_path / "sentinel", master, service="mg")
    try:
        sentinel.wait_replicas_known(1)
        store = RedisStore(sentinels=[sentinel.address], sentinel_service="mg", timeout=0.5, retry_max=0.5)
        bayes = Bayes(store)
        for i in range(5):
            bayes.learn_message(Message.from_bytes(make_message("spam", i)), "spam")
            bayes.learn_message(Message.from_bytes(make_message("ham", i)), "ham")
        master.wait_replicated(replica)
        probe = Message.from_bytes(make_message("spam", 99))
        prob_before = Bayes(store).classify(_tokens(probe))[0]
        assert prob_before > 0.9

        old_port = master.port
        master.kill()
        # Classification never stops: it reads from the replica all along.
        deadline = time.monotonic() + 30
        new_port = None
        while time.monotonic() < deadline:
            prob = bayes.classify(_tokens(probe))[0]
            assert prob == pytest.approx(prob_before)
            new_port = sentinel.master_port()
            if new_port and new_port != old_port:
                break
            time.sleep(0.1)
        assert new_port == replica.port, "Sentinel did not promote the replica"
        # Learning resumes against the promoted master.
        extra = Message.from_bytes(make_message("ham", 50))
        learned = wait_until(lambda: _try_learn(bayes, extra), timeout=15, what="learning on the new master")
        assert learned.outcome == "learned"
        assert replica.role() == "master"
        assert bayes.totals() == (5, 6)
        assert bayes.classify(_tokens(probe))[0] == pytest.approx(prob_before, abs=0.05)
    finally:
        sentinel.stop()


def _tokens(msg):
    from milterguard.learn.tokens import tokenize

    return tokenize(msg)


def _try_learn(bayes, msg):
    try:
        return bayes.learn_message(msg, "ham")
    except RedisUnavailable:
        return None


def _redis_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "milterguard.redis"]


def test_redis_down_during_mail_costs_two_lines_with_the_count_between(tmp_path, master, caplog):
    """Issue 11: with Redis down, one line when it goes, one when it is back, a count in between;
    nothing per message."""
    engine = engine_for(tmp_path, f"redis.url={master.url}", "redis.retry_max=0.5", "dns.enabled=false")
    with caplog.at_level(logging.INFO):
        assert "BAYES_TEMPFAIL" not in scan(engine, message(body="before the outage\r\n"))[0].symbols
        master.stop()
        for n in range(6):
            verdict, _ = scan(engine, message(body=f"message {n} while Redis is down\r\n"))
            assert {"BAYES_TEMPFAIL", "FUZZY_TEMPFAIL"} & set(verdict.symbols), verdict.symbols
            assert "<redis." not in verdict.hit("BAYES_TEMPFAIL").text
        master.restart()
        wait_until(lambda: "BAYES_TEMPFAIL" not in scan(engine, message())[0].symbols, timeout=5,
                   what="Redis used again")
    lines = _redis_lines(caplog)
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"Redis {master.url} unavailable: ConnectionError: "), lines
    assert "back after" in lines[1] and "calls failed or were skipped meanwhile" in lines[1], lines
    assert not [r for r in caplog.records if "Redis" in r.getMessage() and r.name != "milterguard.redis"
                and r.levelno >= logging.INFO]


def test_sentinel_outage_names_the_sentinels_not_the_client_objects(tmp_path, master, caplog):
    sentinel = RedisSentinel.start(tmp_path / "sentinel", master, service="mg")
    try:
        store = RedisStore(sentinels=[sentinel.address], sentinel_service="mg", timeout=0.5, retry_max=0.5)
        store.writer().set(store.key("k"), "v")
        sentinel.stop()
        master.stop()
        with caplog.at_level(logging.INFO, logger="milterguard.redis"):
            for _ in range(5):
                with pytest.raises(RedisUnavailable) as raised:
                    store.reader().get(store.key("k"))
                assert "<redis." not in str(raised.value) and len(str(raised.value)) < 400, raised.value
                time.sleep(0.2)
            master.restart()
            sentinel.restart()
            wait_until(lambda: _answers(store), timeout=10, what="Redis through the Sentinel again")
    finally:
        sentinel.stop()
    lines = _redis_lines(caplog)
    assert len(lines) == 2, lines
    assert f"sentinel {sentinel.address} service mg unavailable: MasterNotFoundError" in lines[0], lines
    assert "<redis." not in lines[0] and len(lines[0]) < 400, lines[0]
    assert "back after" in lines[1], lines
