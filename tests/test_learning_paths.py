"""The fast paths of learning give what the plain ones give: combining, the classifier,
and look-ups started at end of message, on mail of the shared corpus and a real redis-server."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from milterguard.config import load_config
from milterguard.engine.core import Engine
from milterguard.mail.message import Message
from milterguard.mail.raw import iter_message_files, read_message
from milterguard.model import Stage
from milterguard.corpus import select
from milterguard.learn.tokens import tokenize
from milterguard.stores import models as ml
from milterguard.stores.bayes import (MAX_SIGNIFICANT, MIN_STRENGTH, ROBINSON_S, ROBINSON_X, Bayes, _chi2q, combine,
                                      message_digest, token_hash)
from milterguard.stores.hashes import FuzzyStore, digest
from milterguard.clients.redis_client import RedisStore
from support import corpus_dir
from support.authmail import scan_local
from support.redis import redis_available
from support.redis_fixtures import master  # noqa: F401  (fixture)

needs_redis = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")
CORPUS = corpus_dir() / "spamassassin"
needs_corpus = pytest.mark.skipif(not (CORPUS / "spam").is_dir(), reason="the shared corpus is not there")


def loop_combine(counts, n_spam, n_ham):
    """Robinson's f(w) and Fisher's chi-square, one token at a time, as first written."""
    if n_spam <= 0 or n_ham <= 0:
        return 0.5, 0
    probs = []
    for spam, ham in counts:
        n = spam + ham
        if n <= 0:
            continue
        spam_ratio, ham_ratio = spam / n_spam, ham / n_ham
        p = spam_ratio / (spam_ratio + ham_ratio)
        f = (ROBINSON_S * ROBINSON_X + n * p) / (ROBINSON_S + n)
        if abs(f - 0.5) >= MIN_STRENGTH:
            probs.append(f)
    if not probs:
        return 0.5, 0
    probs.sort(key=lambda f: -abs(f - 0.5))
    probs = probs[:MAX_SIGNIFICANT]
    n = len(probs)
    ham_evidence = _chi2q(-2.0 * sum(math.log(f) for f in probs), 2 * n)
    spam_evidence = _chi2q(-2.0 * sum(math.log(1.0 - f) for f in probs), 2 * n)
    return (1.0 + ham_evidence - spam_evidence) / 2.0, n


def test_vectorised_combining_is_the_loop_to_the_last_bit():
    rng = random.Random(7)
    for _ in range(500):
        # Small counts make many tokens of equal strength: the choice among them must not move.
        tokens = rng.randint(0, 600)
        counts = [(rng.randint(0, rng.choice((3, 40, 5000))), rng.randint(0, rng.choice((3, 40, 5000))))
                  for _ in range(tokens)]
        n_spam, n_ham = rng.randint(0, 3000), rng.randint(0, 3000)
        assert combine(counts, n_spam, n_ham) == loop_combine(counts, n_spam, n_ham)


def corpus_messages(kind: str, split: str, limit: int) -> list[Message]:
    paths = sorted(select(list(iter_message_files([str(CORPUS / kind)])), split))[:limit]
    return [Message.from_bytes(read_message(p)) for p in paths]


@needs_corpus
def test_the_classifier_is_scikit_learns_decision_function_on_the_corpus():
    from scipy.sparse import csr_matrix
    from sklearn.linear_model import SGDClassifier

    train = [(m, 1) for m in corpus_messages("spam", "train", 80)] + [(m, 0) for m in corpus_messages("ham", "train", 120)]
    hashes = [[token_hash(t) for t in tokenize(m)] for m, _ in train]
    model = ml.fit([ml.columns(h) for h in hashes], [y for _, y in train])
    reference = SGDClassifier()
    reference.coef_ = model.weights.astype(np.float64).reshape(1, -1)
    reference.intercept_ = np.asarray([model.intercept])
    reference.classes_ = np.asarray([0, 1])
    for m in corpus_messages("spam", "test", 40) + corpus_messages("ham", "test", 40):
        h = [token_hash(t) for t in tokenize(m)]
        cols = ml.columns(h)
        row = csr_matrix((np.full(len(cols), 1.0 / np.sqrt(len(cols))), cols, [0, len(cols)]), shape=(1, ml.DIM))
        z = float(reference.decision_function(row)[0])
        assert model.probability(h) == pytest.approx(1.0 / (1.0 + math.exp(-ml.SCALE * z)), abs=1e-6)


@needs_redis
@needs_corpus
def test_lookups_started_at_end_of_message_give_the_sequential_verdict(tmp_path, master):
    config = load_config(etc_dir=tmp_path, sets=[f"redis.url={master.url}", "bayes.min_learns=5", "dns.enabled=false",
                                                 "bayes.autolearn=false"])
    store = RedisStore.from_config(config)
    bayes = Bayes(store)
    for label, kind in (("spam", "spam"), ("ham", "ham")):
        for m in corpus_messages(kind, "train", 60):
            bayes.learn(message_digest(m), tokenize(m), label)
    ml.train(store)
    tests = [read_message(p) for kind in ("spam", "ham")
             for p in sorted(select(list(iter_message_files([str(CORPUS / kind)])), "test"))[:25]]
    # One reported spam, so that the fuzzy look-up finds something.
    FuzzyStore(store, 3600).add(digest(Message.from_bytes(tests[0]).text))
    started = Engine.load(config, strict=True)
    assert {name for name, _ in started.starters[Stage.EOM]} >= {"bayes", "fuzzy"}
    sequential = Engine.load(config, strict=True)
    sequential.starters[Stage.EOM] = []  # each check looks up for itself, in turn
    learned = 0
    for raw in tests:
        a, b = scan_local(started, raw)[0], scan_local(sequential, raw)[0]
        assert [(h.symbol, h.options, h.weight) for h in a.hits] == [(h.symbol, h.options, h.weight) for h in b.hits]
        assert a.score == b.score
        learned += any(h.symbol.startswith(("BAYES_", "ML_")) for h in a.hits)
    assert learned > len(tests) // 2  # the learned checks said something on most of them
    assert "HASH_DENIED" in {h.symbol for h in scan_local(started, tests[0])[0].hits}


@needs_redis
def test_a_command_sent_now_and_read_later(master):
    from milterguard.clients.redis_client import RedisUnavailable

    master.client().mset({"k": "v", "other": "x"})
    store = RedisStore(url=master.url, timeout=0.5, retry_max=0.1)
    reader = store.reader()
    assert reader.send("GET", "k").result() == b"v"
    # A reply never read must not reach the next command on that connection.
    abandoned = reader.send("GET", "other")
    del abandoned
    assert reader.get("k") == b"v"
    late = reader.send("GET", "other")
    assert reader.get("k") == b"v"  # another connection meanwhile
    assert late.result() == b"x"
    # The server goes away while the command is out: the reply is asked for again, and none comes.
    waiting = reader.send("BLPOP", "nothing", "5")
    master.kill()
    with pytest.raises(RedisUnavailable):
        waiting.result()
    with pytest.raises(RedisUnavailable):
        reader.send("GET", "k").result()
