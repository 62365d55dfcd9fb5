"""Reported spam and its mutated resends: exact and SimHash content hashes in Redis.

The look-up is sent as soon as the message is complete (a starter at EOM,
one Redis round trip whose reply the check reads), and the check runs first among
the end-of-message checks, so that a known spam is decided before the
costly checks (DNS, clamd) of the stage.  A text of fewer than
`fuzzy.min_words` words is neither hashed nor looked up.
Off when Redis is (no redis.url, replicas or sentinels) or fuzzy.enabled is false.
"""

from __future__ import annotations

import logging

from milterguard.checks.registry import check, starter
from milterguard.model import Hits, Stage
from milterguard.stores.hashes import FuzzyStore, digest
from milterguard.settings import redis_configured

log = logging.getLogger("milterguard.fuzzy")


def _lookup(scan):
    """(digest, store, its look-up sent), or None without Redis or for a text too short."""
    from milterguard.clients.redis_client import get_store

    config = scan.config
    store = get_store(config)
    if store is None or scan.message is None:
        return None
    d = digest(scan.message.text, min_words=config["fuzzy.min_words"])
    if d is None:
        return None
    fuzzy_store = FuzzyStore(store, config["fuzzy.ttl"])
    return d, fuzzy_store, fuzzy_store.send_lookup(d)


@starter("fuzzy", Stage.EOM, priority=20, before_rules=True)
def start_fuzzy(scan) -> None:
    """Hash the complete message and send its look-up (read by fuzzy())."""
    if scan.config["fuzzy.enabled"]:
        scan.txn.facts.scratch["fuzzy"] = _lookup(scan)


@check(stage=Stage.EOM, emits=("HASH_DENIED", "FUZZY_DENIED", "FUZZY_TEMPFAIL"), priority=2,
       active=lambda config: config["fuzzy.enabled"] and redis_configured(config))
def fuzzy(scan, hits: Hits) -> None:
    """Look the message's exact hash and SimHash up among the reported ones."""
    config = scan.config
    if not config["fuzzy.enabled"]:
        return
    # Imported here: the Redis client library is only needed when fuzzy hashing is on.
    from milterguard.clients.redis_client import RedisUnavailable

    scratch = scan.txn.facts.scratch
    started = scratch.pop("fuzzy") if "fuzzy" in scratch else _lookup(scan)
    if started is None:
        return  # no Redis, or too short a text
    d, fuzzy_store, sent = started
    max_distance = config["fuzzy.max_distance"]
    try:
        match = fuzzy_store.lookup(d, max_distance, sent)
    except RedisUnavailable as exc:
        # The Redis client logs the outage once; a line per message would flood the log.
        log.debug("fuzzy look-up failed for %s: %s", scan.txn.queue_id or scan.conn.ident, exc)
        hits.add("FUZZY_TEMPFAIL", where="redis", text=str(exc)[:160])
        return
    if match is None:
        return
    if match.kind == "exact":
        hits.add("HASH_DENIED", d.exact[:16], where="body hash", text=f"exact hash {d.exact[:16]}... of a reported message")
    else:
        # The weight shrinks with the distance: half of it at the largest distance allowed.
        factor = 1.0 - 0.5 * match.distance / (max_distance + 1)
        hits.add("FUZZY_DENIED", f"distance {match.distance}", where="body simhash", factor=factor,
                 text=f"simhash {d.simhex} is {match.distance} bits from reported {match.simhash}")
