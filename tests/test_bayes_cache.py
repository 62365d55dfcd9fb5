"""The Bayes token cache of a filter process, against a real redis-server and the shared corpus."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

from milterguard.clients.redis_client import RedisStore
from milterguard.config import load_config
from milterguard.corpus import select
from milterguard.engine.core import Engine
from milterguard.learn.linear import token_hashes
from milterguard.learn.tokens import tokenize
from milterguard.mail.message import Message
from milterguard.mail.raw import iter_message_files, read_message
from milterguard.stores.bayes import Bayes
from milterguard.stores.bayes_cache import TokenCache
from support import corpus_dir
from support.authmail import scan_local
from support.mailgen import make_message
from support.redis import redis_available
from support.redis_fixtures import master  # noqa: F401  (fixture)

needs_redis = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")
CORPUS = corpus_dir() / "spamassassin"
needs_corpus = pytest.mark.skipif(not (CORPUS / "spam").is_dir(), reason="the shared corpus is not there")


def _split(kind: str, split: str, limit: int) -> list[str]:
    return sorted(select(list(iter_message_files([str(CORPUS / kind)])), split))[:limit]


def _engine(tmp_path: Path, url: str, *sets: str) -> Engine:
    return Engine.load(load_config(etc_dir=tmp_path, sets=[
        f"redis.url={url}", "bayes.min_learns=5", "dns.enabled=false", "ml.enabled=false", "fuzzy.enabled=false",
        "bayes.autolearn=false", *sets]))


def _bayes_of(engine: Engine) -> Bayes:
    from milterguard.checks.learning import _BAYES
    from milterguard.clients.redis_client import get_store

    return _BAYES[id(get_store(engine.config))]


def _hashes(raw: bytes) -> np.ndarray:
    return np.asarray(token_hashes(tokenize(Message.from_bytes(raw))), dtype=np.uint64)


@needs_redis
@needs_corpus
def test_corpus_scanned_with_the_cache_on_and_off_gives_the_same_probabilities(tmp_path, master):
    learner = Bayes(RedisStore(url=master.url))
    for path in _split("spam", "train", 120):
        learner.learn_message(Message.from_bytes(read_message(path)), "spam")
    for path in _split("ham", "train", 120):
        learner.learn_message(Message.from_bytes(read_message(path)), "ham")
    raws = [read_message(p) for p in _split("spam", "test", 40) + _split("ham", "test", 40)]

    def probabilities(engine: Engine) -> list[tuple]:
        out = []
        for raw in raws:
            verdict, txn = scan_local(engine, raw)
            bayes = txn.facts.bayes
            out.append((bayes.probability, bayes.detail, sorted(s for s in verdict.symbols if s.startswith("BAYES"))))
        return out

    uncached = probabilities(_engine(tmp_path, master.url, "bayes.cache_slots=0"))
    assert _bayes_of(_engine(tmp_path, master.url, "bayes.cache_slots=0")).cache() is None
    # A small table (collisions: tokens take each other's slots) and the default one; twice each,
    # the second pass finding most tokens in the table.
    for slots in (512, 1 << 18):
        engine = _engine(tmp_path, master.url, f"bayes.cache_slots={slots}", "bayes.cache_ttl=3600")
        assert probabilities(engine) == uncached
        cache = _bayes_of(engine).cache()
        first = cache.hits
        assert probabilities(engine) == uncached
        assert cache.hits - first > (0.8 if slots > 512 else 0.0) * (cache.lookups / 2), (slots, cache.hits)
    assert len({p for p, _, _ in uncached}) > 20  # the messages tell apart: not one answer for all
    assert any(s == ["BAYES_SPAM"] for _, _, s in uncached) and any(s == ["BAYES_HAM"] for _, _, s in uncached)


@needs_redis
def test_counts_learned_elsewhere_are_seen_once_the_ttl_has_passed(tmp_path, master):
    other_node = Bayes(RedisStore(url=master.url))
    for i in range(6):
        other_node.learn_message(Message.from_bytes(make_message("spam", i)), "spam")
        other_node.learn_message(Message.from_bytes(make_message("ham", i)), "ham")
    ttl = 0.3
    engine = _engine(tmp_path, master.url, "bayes.cache_slots=4096", f"bayes.cache_ttl={ttl}")
    message = make_message("spam", 50)
    uncached = Bayes(RedisStore(url=master.url))
    before, _ = scan_local(engine, message)
    assert _bayes_of(engine).cache().lookups > 0
    # Another node learns the message itself as ham: each of its tokens gains a ham count.
    other_node.learn_message(Message.from_bytes(message), "ham")
    time.sleep(ttl * 2)
    after, txn = scan_local(engine, message)
    expected = uncached.classify_hashes(_hashes(message))
    assert (txn.facts.bayes.probability, txn.facts.bayes.detail["ham"]) == (expected[0], 7)
    assert txn.facts.bayes.probability < float(before.hit("BAYES_SPAM").options[0])


@needs_redis
def test_within_the_ttl_learning_by_this_process_is_seen_and_other_nodes_after_the_ttl(master):
    now = [1000.0]
    bayes = Bayes(RedisStore(url=master.url))
    slots = 1 << 20
    bayes.set_cache(slots, 60.0)
    bayes._cache = TokenCache(slots, 60.0, clock=lambda: now[0])  # a clock the test moves
    other_node = Bayes(RedisStore(url=master.url))
    first, second = make_message("spam", 1), make_message("spam", 2)
    hashes = _hashes(first)
    assert len(set(((hashes >> np.uint64(8)) % np.uint64(slots)).tolist())) == len(hashes)  # a slot each
    other_node.learn_message(Message.from_bytes(first), "spam")
    assert bayes.fetch_values(hashes)[2].tolist() == [1 << 32] * len(hashes)
    # Learned elsewhere: the totals move at once, the token counts kept here within the TTL do not.
    other_node.learn_message(Message.from_bytes(second), "spam")
    common = np.isin(hashes, _hashes(second))
    assert common.any() and not common.all()
    n_spam, _, values = bayes.fetch_values(hashes)
    assert n_spam == 2 and values.tolist() == [1 << 32] * len(hashes)
    now[0] += 61.0
    values = bayes.fetch_values(hashes)[2]
    assert values[common].tolist() == [2 << 32] * int(common.sum())
    assert values[~common].tolist() == [1 << 32] * int((~common).sum())
    # Learned by this process: seen at once.
    bayes.learn_message(Message.from_bytes(first), "ham")
    assert bayes.fetch_values(hashes)[2].tolist() == other_node.fetch_values(hashes)[2].tolist()
    assert bayes.fetch_values(hashes)[2][~common].tolist() == [1] * int((~common).sum())


@needs_redis
def test_redis_down_gives_tempfail_not_the_cached_counts(tmp_path, master, caplog):
    learner = Bayes(RedisStore(url=master.url))
    for i in range(6):
        learner.learn_message(Message.from_bytes(make_message("spam", i)), "spam")
        learner.learn_message(Message.from_bytes(make_message("ham", i)), "ham")
    engine = _engine(tmp_path, master.url, "bayes.cache_ttl=3600", "redis.prefix=mg:")
    message = make_message("spam", 60)
    verdict, _ = scan_local(engine, message)
    assert "BAYES_SPAM" in verdict.symbols
    master.stop()
    with caplog.at_level(logging.WARNING, logger="milterguard.redis"):
        for _ in range(3):
            verdict, txn = scan_local(engine, message)
            assert "BAYES_TEMPFAIL" in verdict.symbols and "BAYES_SPAM" not in verdict.symbols
            assert txn.facts.bayes is None
    assert len([r for r in caplog.records if r.name == "milterguard.redis"]) == 1


@needs_redis
def test_a_forked_worker_makes_its_own_table(master):
    bayes = Bayes(RedisStore(url=master.url))
    bayes.set_cache(1 << 10, 60.0)
    hashes = _hashes(make_message("spam", 3))
    bayes.fetch_values(hashes)
    parent = bayes.cache()
    assert parent.lookups == len(hashes)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            child = bayes.cache()
            bayes.fetch_values(hashes)
            os.write(write_end, f"{child is parent} {child.lookups} {child.hits}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    assert os.read(read_end, 64).decode() == f"False {len(hashes)} 0"
    os.close(read_end)
    assert bayes.cache() is parent and parent.lookups == len(hashes)


@needs_redis
def test_a_look_up_sent_before_this_process_learns_does_not_fill_the_table(master):
    bayes = Bayes(RedisStore(url=master.url))
    bayes.set_cache(1 << 20, 3600.0)
    message = make_message("spam", 4)
    hashes = _hashes(message)
    lookup = bayes.send_fetch(hashes)  # sent, not read: its answer may be from before the learn
    assert bayes.cache().lookups == len(hashes) and bayes.cache().hits == 0
    bayes.learn_message(Message.from_bytes(message), "spam")
    bayes.fetch_values(hashes, lookup)
    # The table kept nothing of that answer: the next look-up asks Redis again, and reads the learned
    # counts; the one after finds them in the table.
    assert bayes.fetch_values(hashes)[2].tolist() == [1 << 32] * len(hashes)
    assert bayes.cache().hits == 0
    assert bayes.fetch_values(hashes)[2].tolist() == [1 << 32] * len(hashes)
    assert bayes.cache().hits == len(hashes)
