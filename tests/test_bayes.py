"""Tokenizer, Bayes and the trained classifier, against real redis-server processes."""

from __future__ import annotations

import json
import logging
import mailbox
import os
import pytest

from milterguard.cli import main as cli_main
from milterguard.config import load_config
from milterguard.engine.core import Engine
from milterguard.stores import models as ml
from milterguard.stores.bayes import Bayes, combine, message_digest, token_hash
from milterguard.learn.tokens import MAX_TOKENS, tokenize
from milterguard.mail.message import Message
from milterguard.clients.redis_client import RedisStore
from support import wait_until
from support.authmail import scan_local
from support.mailgen import make_message, write_corpus
from support.redis import redis_available
from support.redis_fixtures import master, replica  # noqa: F401  (fixtures)

needs_redis = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")


def msg(label: str, index: int, extra: str = "") -> Message:
    return Message.from_bytes(make_message(label, index, extra))


def learn_some(bayes: Bayes, n: int = 12) -> None:
    for i in range(n):
        bayes.learn_message(msg("spam", i), "spam")
        bayes.learn_message(msg("ham", i), "ham")


def engine_for(tmp_path, *sets: str) -> Engine:
    return Engine.load(load_config(etc_dir=tmp_path, sets=["bayes.min_learns=5", "dns.enabled=false", *sets]
                                   if _has_dns_setting() else ["bayes.min_learns=5", *sets]))


def _has_dns_setting() -> bool:
    from milterguard.settings import BY_KEY

    return "dns.enabled" in BY_KEY


# ---------------------------------------------------------------- tokenizer


def test_tokens_are_deterministic_capped_and_cover_text_headers_and_urls():
    raw = (b"From: Shop <deals@mail.shop.example.co.uk>\nTo: a@example.net\nSubject: Cheap Pills today\n"
           b"Reply-To: x@other.example\nMessage-ID: <abc123@mail.shop.example.co.uk>\n"
           b"Content-Type: text/html; charset=utf-8\n\n"
           b"<html><body><p>Buy <b>CHEAP</b> pills</p><a href='https://www.pills.example.com/x'>here</a>"
           b" 1234567890</body></html>\n")
    tokens = tokenize(Message.from_bytes(raw))
    assert tokens == tokenize(Message.from_bytes(raw))
    assert len(tokens) == len(set(tokens))
    for token in ("s:cheap", "s:cheap pills", "s:cheap _ today", "buy", "cheap", "buy cheap", "buy _ pills",
                  "h:from:mail.shop.example.co.uk", "h:fromreg:example.co.uk", "h:reply-to:differs",
                  "u:www.pills.example.com", "u:reg:example.com", "n:10d",
                  "c:s: ch", "c:s:s to", "c:s:pill", "c:f: sh", "c:f:hop "):
        assert token in tokens, token
    assert not any("<" in t or "href" in t for t in tokens)  # HTML reduced to text
    assert not any(t.startswith("c:") and len(t) - len("c:s:") not in (3, 4) for t in tokens)
    big = b"Subject: x\n\n" + b" ".join(b"w%d" % i for i in range(20000)) + b"\n"
    assert len(tokenize(Message.from_bytes(big))) == MAX_TOKENS


def test_chi_square_combining():
    assert combine([(50, 0)] * 20, 100, 100)[0] > 0.99
    assert combine([(0, 50)] * 20, 100, 100)[0] < 0.01
    assert combine([(5, 5)] * 20, 100, 100) == (0.5, 0)  # no telling token
    assert combine([(5, 0)], 0, 100) == (0.5, 0)  # nothing learned of one class


# ---------------------------------------------------------------- Bayes in Redis


@needs_redis
def test_learn_on_master_classify_on_a_node_reading_the_replica(tmp_path, master, replica):
    learner = Bayes(RedisStore(url=master.url))
    learn_some(learner)
    master.wait_replicated(replica)
    engine = engine_for(tmp_path, f"redis.replicas={replica.url}", "redis.prefix=mg:")
    verdict, txn = scan_local(engine, make_message("spam", 100))
    hit = verdict.hit("BAYES_SPAM")
    assert hit is not None and float(hit.options[0]) > 0.95
    assert 0 < hit.weight <= 4.0  # scaled by the probability
    assert txn.facts.bayes.detail["spam"] == 12
    verdict, _ = scan_local(engine, make_message("ham", 100))
    assert verdict.hit("BAYES_HAM") is not None and verdict.hit("BAYES_SPAM") is None


@needs_redis
def test_silent_until_min_learns(tmp_path, master):
    learn_some(Bayes(RedisStore(url=master.url)), 4)
    verdict, txn = scan_local(engine_for(tmp_path, f"redis.url={master.url}"), make_message("spam", 100))
    assert not {"BAYES_SPAM", "BAYES_HAM"} & set(verdict.symbols)
    assert txn.facts.bayes.detail["spam"] == 4


@needs_redis
def test_learning_twice_counts_once_relearn_moves_and_unlearn_removes(master):
    bayes = Bayes(RedisStore(url=master.url))
    m = msg("spam", 1)
    hashes = [token_hash(t) for t in tokenize(m)]
    assert bayes.learn_message(m, "spam").outcome == "learned"
    # Another node (another store on the same Redis) learning it again changes nothing.
    assert Bayes(RedisStore(url=master.url)).learn_message(m, "spam").outcome == "known"
    n_spam, n_ham, counts = bayes.fetch(hashes)
    assert (n_spam, n_ham) == (1, 0) and set(counts) == {(1, 0)}
    assert bayes.learn_message(m, "ham").outcome == "relearned"
    n_spam, n_ham, counts = bayes.fetch(hashes)
    assert (n_spam, n_ham) == (0, 1) and set(counts) == {(0, 1)}
    assert bayes.unlearn_message(m).outcome == "unlearned"
    assert bayes.unlearn_message(m).outcome == "known"
    n_spam, n_ham, counts = bayes.fetch(hashes)
    assert (n_spam, n_ham) == (0, 0) and set(counts) == {(0, 0)}
    assert bayes.stats()["tokens"] == 0  # fields at zero are removed, not left behind


@needs_redis
def test_expiry_drops_rare_tokens_first(master):
    bayes = Bayes(RedisStore(url=master.url))
    learn_some(bayes, 10)
    before = bayes.stats()["tokens"]
    common = token_hash("h:from:promo-offers.example")  # in every spam
    result = bayes.expire(max_tokens=before // 4)
    assert result["tokens"] <= before // 4 < before
    assert bayes.stats()["tokens"] == result["tokens"]
    assert bayes.fetch([common])[2] == [(10, 0)]


@needs_redis
def test_redis_down_mail_flows_with_tempfail_and_one_log_line(tmp_path, master, caplog):
    url = master.url
    master.stop()
    engine = engine_for(tmp_path, f"redis.url={url}", "redis.prefix=down:")
    with caplog.at_level(logging.WARNING, logger="milterguard.redis"):
        for i in range(5):
            verdict, _ = scan_local(engine, make_message("spam", i))
            assert "BAYES_TEMPFAIL" in verdict.symbols
            assert verdict.action.label in ("accept", "tag", "review", "reject")
    lines = [r.getMessage() for r in caplog.records if r.name == "milterguard.redis"]
    assert len(lines) == 1, lines


@needs_redis
def test_autolearn_learns_new_mail_by_score_and_never_overrules(tmp_path, master, replica):
    bayes = Bayes(RedisStore(url=master.url))
    taught = make_message("ham", 400)
    bayes.learn_message(Message.from_bytes(taught), "ham")
    # Every score is at or above -1000: everything new is learned as spam.
    engine = engine_for(tmp_path, f"redis.url={master.url}", "bayes.autolearn=true", "bayes.autolearn_spam=-1000")
    scan_local(engine, make_message("spam", 400))
    scan_local(engine, make_message("spam", 400))  # the same message again: counted once
    scan_local(engine, taught)  # taught as ham by an operator: left alone
    assert bayes.totals() == (1, 1)
    # Off by default, and a node reading a replica never writes.
    scan_local(engine_for(tmp_path, f"redis.url={master.url}"), make_message("spam", 401))
    scan_local(engine_for(tmp_path, f"redis.replicas={replica.url}", "bayes.autolearn=true",
                    "bayes.autolearn_spam=-1000"), make_message("spam", 402))
    assert bayes.totals() == (1, 1)


# ---------------------------------------------------------------- classifier


@needs_redis
def test_a_new_model_is_picked_up_by_a_running_engine(tmp_path, master):
    store = RedisStore(url=master.url)
    learn_some(Bayes(store), 12)
    first = ml.train(store)
    assert first.version == 1 and first.samples == 24
    engine = engine_for(tmp_path, f"redis.url={master.url}", "ml.poll_interval=0.2")
    verdict, txn = scan_local(engine, make_message("spam", 200))
    assert txn.facts.classifier.detail["version"] == 1
    assert verdict.hit("ML_SPAM") is not None
    # Publish a model trained on the opposite labels: the running engine swaps it in.
    rows, y = ml.load_samples(store)
    flipped = ml.fit(rows, [1 - v for v in y], version=2)
    ml.publish(store, flipped)

    def swapped():
        verdict, txn = scan_local(engine, make_message("spam", 200))
        return (verdict, txn) if txn.facts.classifier.detail["version"] == 2 else None

    verdict, txn = wait_until(swapped, timeout=5, interval=0.1, what="the running engine to load version 2")
    assert verdict.hit("ML_HAM") is not None and verdict.hit("ML_SPAM") is None


@needs_redis
def test_a_worker_forked_during_a_load_still_polls(master):
    store = RedisStore(url=master.url)
    learn_some(Bayes(store), 6)
    cache = ml.model_cache(store, 0.0)
    assert cache.current() is None  # nothing trained yet
    ml.train(store)
    cache._lock.acquire()  # as if a background load were running in the supervisor
    try:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            try:
                model = cache.current()
                os.write(write_end, str(model.version if model else 0).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        os.waitpid(pid, 0)
        assert os.read(read_end, 16) == b"1"
        os.close(read_end)
    finally:
        cache._lock.release()


# ---------------------------------------------------------------- command line


@needs_redis
def test_learn_command_reads_dirs_mbox_and_maildir_and_is_idempotent(tmp_path, master, capsys):
    spam_dir, ham_dir = write_corpus(tmp_path / "corpus", spam=6, ham=6)
    box = mailbox.mbox(str(tmp_path / "spam.mbox"))
    for i in range(10, 13):
        box.add(make_message("spam", i))
    box.close()
    md = mailbox.Maildir(str(tmp_path / "Maildir"))
    for i in range(10, 14):
        md.add(make_message("ham", i))
    sets = ["--etc-dir", str(tmp_path), "--set", f"redis.url={master.url}"]
    assert cli_main(["learn", "--spam", str(spam_dir), str(tmp_path / "spam.mbox"), *sets]) == 0
    assert cli_main(["learn", "--ham", str(ham_dir), str(tmp_path / "Maildir"), *sets]) == 0
    out = capsys.readouterr().out
    assert "9 learned" in out and "now 9 spam and 10 ham learned" in out
    assert cli_main(["learn", "--spam", str(spam_dir), *sets]) == 0
    assert "6 known" in capsys.readouterr().out
    assert cli_main(["learn", "--ham", str(spam_dir / "spam0000.eml"), *sets]) == 0
    assert "1 relearned; now 8 spam and 11 ham" in capsys.readouterr().out
    assert cli_main(["unlearn", str(spam_dir / "spam0000.eml"), *sets]) == 0
    assert "now 8 spam and 10 ham" in capsys.readouterr().out
    assert cli_main(["bayes", "stats", "--json", *sets]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["spam"], stats["ham"], stats["samples"]) == (8, 10, 18) and stats["tokens"] > 100
    assert cli_main(["train", *sets]) == 0
    assert "model version 1 trained on 18 samples" in capsys.readouterr().out
    # A node that only reads a replica refuses to learn.
    assert cli_main(["learn", "--spam", str(spam_dir), "--etc-dir", str(tmp_path),
                     "--set", f"redis.replicas={master.url}"]) == 2
    assert "only reads Redis" in capsys.readouterr().err


@needs_redis
def test_evaluate_on_a_small_sample(tmp_path, master, capsys):
    spam_dir, ham_dir = write_corpus(tmp_path / "corpus", spam=40, ham=40)
    rc = cli_main(["evaluate", "--spam", str(spam_dir), "--ham", str(ham_dir), "--json", "--etc-dir", str(tmp_path),
                   "--set", f"redis.url={master.url}", "--set", "bayes.min_learns=5"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test"]["spam"] > 0 and result["test"]["ham"] > 0
    assert result["train"]["spam"] + result["test"]["spam"] == 40
    assert result["scorers"]["bayes"]["auc"] > 0.95 and result["scorers"]["classifier"]["auc"] > 0.95
    assert set(result["thresholds"]) == {"tag", "review", "reject"}
    assert result["not_counted"] == ["RCVD_NONE"]  # these messages have no Received header
    # Everything it wrote went under its own prefix and was removed.
    assert master.client().dbsize() == 0
