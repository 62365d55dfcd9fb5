"""The learned classifiers at end of message: Bayes and the trained model.

Both read Redis (a replica when one is configured) and never write to it
while classifying.  Redis unreachable gives BAYES_TEMPFAIL / ML_TEMPFAIL
and the message goes on; the first failure of an outage is logged once by
milterguard.redisstore.  Symbol weights scale with the probability:
`factor = (p - 0.5) / 0.5` for spam, `(0.5 - p) / 0.5` for ham.
"""

from __future__ import annotations

from milterguard.engine.checks import check
from milterguard.engine.model import Hits, Stage
from milterguard.learn.bayes import Bayes, token_hash
from milterguard.learn.model import model_cache
from milterguard.learn.tokens import tokenize
from milterguard.redisstore import RedisUnavailable, get_store

_BAYES: dict[int, Bayes] = {}


def tokens_of(scan) -> list[str]:
    """The message's tokens, computed once per message for both classifiers."""
    facts = scan.txn.facts.setdefault("tokens", {})
    if "tokens" not in facts:
        facts["tokens"] = tokenize(scan.message)
        facts["hashes"] = [token_hash(t) for t in facts["tokens"]]
    return facts["tokens"]


def bayes_for(store) -> Bayes:
    bayes = _BAYES.get(id(store))
    if bayes is None or bayes.store is not store:
        bayes = _BAYES[id(store)] = Bayes(store)
    return bayes


def _emit(hits: Hits, prefix: str, prob: float, spam_at: float, ham_at: float, detail: str) -> None:
    option = f"{prob:.3f}"
    if prob >= spam_at:
        hits.add(f"{prefix}_SPAM", option, where="learned", text=detail, factor=(prob - 0.5) / 0.5)
    elif prob <= ham_at:
        hits.add(f"{prefix}_HAM", option, where="learned", text=detail, factor=(0.5 - prob) / 0.5)


@check(stage=Stage.EOM, emits=("BAYES_SPAM", "BAYES_HAM", "BAYES_TEMPFAIL"), priority=60)
def bayes(scan, hits: Hits) -> None:
    """Bayes probability from the token counts learned in Redis."""
    config = scan.config
    if scan.message is None or not config["bayes.enabled"]:
        return
    store = get_store(config)
    if store is None:
        return
    tokens = tokens_of(scan)
    try:
        prob, used, n_spam, n_ham = bayes_for(store).classify(tokens)
    except RedisUnavailable as exc:
        hits.add("BAYES_TEMPFAIL", where="Redis", text=str(exc)[:200])
        return
    scan.txn.facts["bayes"] = {"probability": prob, "tokens": used, "spam": n_spam, "ham": n_ham}
    minimum = config["bayes.min_learns"]
    if n_spam < minimum or n_ham < minimum:
        return  # not trained enough to say anything
    _emit(hits, "BAYES", prob, config["bayes.spam_probability"], config["bayes.ham_probability"],
          f"{used} tokens; learned {n_spam} spam, {n_ham} ham")


@check(stage=Stage.EOM, emits=("ML_SPAM", "ML_HAM", "ML_TEMPFAIL"), priority=61)
def classifier(scan, hits: Hits) -> None:
    """Probability from the trained model shared through Redis."""
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
    prob = model.probability(scan.txn.facts["tokens"]["hashes"])
    scan.txn.facts["classifier"] = {"probability": prob, "version": model.version}
    _emit(hits, "ML", prob, config["ml.spam_probability"], config["ml.ham_probability"],
          f"model version {model.version}")
