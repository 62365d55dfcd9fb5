"""Learning end to end: Postfix -> milterguard serve (2 workers) -> sink, Redis master and replica.

The filter reads a replica only; learning and training happen on the
master while it runs, and the filter's workers pick up the new model
without a restart.
"""

from __future__ import annotations

import re

import pytest

from milterguard.stores import models as ml
from milterguard.stores.bayes import Bayes
from milterguard.mail.message import Message
from milterguard.clients.redis_client import RedisStore
from support import wait_until
from support.mailgen import make_message
from support.redis import redis_available
from support.redis_fixtures import master, replica  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.postfix,
              pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")]


def with_id(raw: bytes, msgid: str) -> bytes:
    return re.sub(rb"Message-ID: <[^>]*>", f"Message-ID: <{msgid}>".encode(), raw)


def test_running_filter_classifies_from_a_replica_and_swaps_in_a_new_model(
        tmp_path, master, replica, milterguard_factory, postfix_factory, sink):
    store = RedisStore(url=master.url)
    bayes = Bayes(store)
    for i in range(12):
        bayes.learn_message(Message.from_bytes(make_message("spam", i)), "spam")
        bayes.learn_message(Message.from_bytes(make_message("ham", i)), "ham")
    ml.train(store)
    master.wait_replicated(replica)
    mg = milterguard_factory(workers=2, sets={"redis.replicas": replica.url, "bayes.min_learns": "5",
                                              "ml.poll_interval": "0.2", "actions.mode": "tag-only"})
    pf = postfix_factory(mg)

    raw = make_message("spam", 300)
    assert pf.send(with_id(raw, "first@example")).code == 250
    verdict = mg.verdict_for("first@example")
    assert verdict.has("BAYES_SPAM") and verdict.has("ML_SPAM")

    # Publish a model that says the opposite; the running workers load it.
    rows, labels = ml.load_samples(store)
    ml.publish(store, ml.fit(rows, [1 - v for v in labels], version=2))
    master.wait_replicated(replica)
    sent = iter(range(100))

    def flipped() -> bool:
        msgid = f"again{next(sent)}@example"
        assert pf.send(with_id(raw, msgid)).code == 250
        return mg.verdict_for(msgid).has("ML_HAM")

    wait_until(flipped, timeout=20, interval=0.3, what="the workers to use model version 2")
    assert "classifier model version 2 loaded" in mg.log_text()
