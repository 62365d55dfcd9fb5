"""The learned classifiers at end of message: Bayes and the trained model.

Both read Redis (a replica when one is configured) and never write to it
while classifying.  The Bayes look-up is sent as soon as the message is
complete, before the end-of-message rules and checks (a starter at EOM): the
message is tokenized once, and the look-up of its token counts is sent to
Redis, which works on it while those rules and checks run; the Bayes check reads the
answer.  Token counts read within `bayes.cache_ttl` seconds are taken from
the process's token cache (stores/bayes_cache.py) and not asked for again.
Redis unreachable gives BAYES_TEMPFAIL / ML_TEMPFAIL and the message goes
on; the first failure of an outage is logged once by
milterguard.clients.redis_client.  Symbol weights scale with the probability:
`factor = (p - 0.5) / 0.5` for spam, `(0.5 - p) / 0.5` for ham.

Autolearn (off by default) learns a scanned message once it is scored, as
scoring decided (`Verdict.learn`, see milterguard/scoring.py), only on a
node that may write to the master, and never over a message learned before.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from milterguard.checks.registry import check, on_verdict, preparer, starter
from milterguard.model import Hits, Learned, Stage
from milterguard.learn.tokens import Pieces, tokenize
from milterguard.settings import redis_configured

# The Redis client and numpy (clients.redis_client, stores.bayes and stores.models) are
# imported by the functions below, which run only with Redis configured: a filter or a
# scan without Redis does not pay their 0.3 s of start-up.
if TYPE_CHECKING:  # pragma: no cover
    from milterguard.stores.bayes import Bayes

log = logging.getLogger("milterguard.learn")

_BAYES: dict[int, "Bayes"] = {}


def pieces_of(scan) -> Pieces:
    """What the message's tokens are made of, made once per message for Bayes, the site's
    classifier and the shipped model (checks/shipped_model.py)."""
    facts = scan.txn.facts
    if facts.token_pieces is None or facts.token_pieces.msg is not scan.message:
        facts.token_pieces = Pieces(scan.message)
    return facts.token_pieces


def tokens_of(scan) -> list[str]:
    """The message's tokens and their hashes, computed once per message for both classifiers."""
    from milterguard.learn.linear import token_hash_array

    facts = scan.txn.facts
    if facts.tokens is None:
        facts.tokens = tokenize(scan.message, pieces_of(scan))
        facts.token_hashes = token_hash_array(facts.tokens)
    return facts.tokens


def bayes_for(store, config) -> "Bayes":
    from milterguard.stores.bayes import Bayes

    bayes = _BAYES.get(id(store))
    if bayes is None or bayes.store is not store:
        bayes = _BAYES[id(store)] = Bayes(store, max_samples=config["ml.max_samples"])
    bayes.set_cache(config["bayes.cache_slots"], config["bayes.cache_ttl"])
    return bayes


@preparer("bayes")
def connect_at_load(config) -> None:
    """Ask Redis once when the engine loads, so that a Redis down at start is logged then,
    and load the classifier's model before the workers fork (they share it)."""
    from milterguard.clients.redis_client import RedisUnavailable, get_store
    from milterguard.stores.models import model_cache

    store = get_store(config)
    if store is None or not config["ml.enabled"]:
        return
    try:
        model_cache(store, config["ml.poll_interval"]).current()
    except RedisUnavailable:
        pass  # logged by the store; the workers ask again


def _emit(hits: Hits, prefix: str, prob: float, spam_at: float, ham_at: float, detail: str) -> None:
    option = f"{prob:.3f}"
    if prob >= spam_at:
        hits.add(f"{prefix}_SPAM", option, where="learned", text=detail, factor=(prob - 0.5) / 0.5)
    elif prob <= ham_at:
        hits.add(f"{prefix}_HAM", option, where="learned", text=detail, factor=(0.5 - prob) / 0.5)


def _bayes_active(config) -> bool:
    return config["bayes.enabled"] and redis_configured(config)


def _bayes_store(scan):
    """The Redis store Bayes reads for this message, or None when there is nothing to look up."""
    from milterguard.clients.redis_client import get_store

    if scan.message is None or not scan.config["bayes.enabled"]:
        return None
    return get_store(scan.config)


@starter("bayes", Stage.EOM, priority=10, before_rules=True)  # the longest wait: started first
def start_bayes(scan) -> None:
    """Tokenize the complete message and send the look-up of its token counts (read by bayes())."""
    store = _bayes_store(scan)
    if store is None:
        return
    tokens_of(scan)
    facts = scan.txn.facts
    facts.scratch["bayes"] = bayes_for(store, scan.config).send_fetch(facts.token_hashes)


@check(stage=Stage.EOM, emits=("BAYES_SPAM", "BAYES_HAM", "BAYES_TEMPFAIL"), priority=60, active=_bayes_active)
def bayes(scan, hits: Hits) -> None:
    """Bayes probability from the token counts learned in Redis."""
    from milterguard.clients.redis_client import RedisUnavailable

    config = scan.config
    store = _bayes_store(scan)
    if store is None:
        return
    tokens_of(scan)
    sent = scan.txn.facts.scratch.pop("bayes", None)
    db = bayes_for(store, config)
    try:
        # The same look-up either way: sent by start_bayes, or now when it was not.
        fetched = db.fetch_values(scan.txn.facts.token_hashes, sent)
    except RedisUnavailable as exc:
        hits.add("BAYES_TEMPFAIL", where="Redis", text=str(exc)[:200])
        return
    prob, used, n_spam, n_ham = db.classify_values(*fetched)
    scan.txn.facts.bayes = Learned(prob, {"tokens": used, "spam": n_spam, "ham": n_ham})
    minimum = config["bayes.min_learns"]
    if n_spam < minimum or n_ham < minimum:
        return  # not trained enough to say anything
    _emit(hits, "BAYES", prob, config["bayes.spam_probability"], config["bayes.ham_probability"],
          f"{used} tokens; learned {n_spam} spam, {n_ham} ham")


@check(stage=Stage.EOM, emits=("ML_SPAM", "ML_HAM", "ML_TEMPFAIL"), priority=61,
       active=lambda config: config["ml.enabled"] and redis_configured(config))
def classifier(scan, hits: Hits) -> None:
    """Probability from the trained model shared through Redis."""
    from milterguard.clients.redis_client import RedisUnavailable, get_store
    from milterguard.stores.models import model_cache

    config = scan.config
    if scan.message is None or not config["ml.enabled"]:
        return
    store = get_store(config)
    if store is None:
        return
    try:
        model = model_cache(store, config["ml.poll_interval"]).current()
    except RedisUnavailable as exc:
        hits.add("ML_TEMPFAIL", where="Redis", text=str(exc)[:200])
        return
    if model is None:
        return  # nothing trained yet
    tokens_of(scan)
    prob = model.probability(scan.txn.facts.token_hashes)
    scan.txn.facts.classifier = Learned(prob, {"version": model.version, "samples": model.samples})
    _emit(hits, "ML", prob, config["ml.spam_probability"], config["ml.ham_probability"],
          f"model version {model.version}")


@on_verdict("bayes")
def autolearn(scan, verdict) -> None:
    """Learn the message as scoring decided (Verdict.learn), when bayes.autolearn is on."""
    from milterguard.clients.redis_client import RedisUnavailable, get_store
    from milterguard.stores.bayes import message_digest

    config = scan.config
    label = verdict.learn
    if not label or scan.message is None:
        return
    store = get_store(config)
    if store is None or not store.can_write:
        return
    try:
        result = bayes_for(store, config).learn(message_digest(scan.message), tokens_of(scan), label, only_new=True)
    except RedisUnavailable:
        return  # logged once per outage by the store
    if result.outcome == "learned":
        log.info("autolearn %s as %s (score %.2f)", scan.txn.queue_id or scan.conn.ident, label, verdict.score)
