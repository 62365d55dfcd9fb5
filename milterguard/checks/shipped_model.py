"""The model shipped with milterguard: a classifier that works on day one, without Redis.

`ml.default_model` names it (`builtin`: `milterguard/data/default-model.bin`,
built by `milterguard train --corpus`, see milterguard/cli/shipped.py).  It
scores the message's tokens as the shipped model sees them
(`learn.linear.shipped_tokens`: the shared tokens without word pairs, list
headers, list names or footers, hashed by CRC-32) and adds ML_DEFAULT_SPAM or ML_DEFAULT_HAM, whose weights scale with
the probability as ML_SPAM's do.

Outweighed by what the site learns: once the site has a model of its own in
Redis (`milterguard train`), the shipped model's weight is multiplied by
`1 - n / ml.default_fade`, n being the messages that model was trained on;
from `ml.default_fade` messages on it adds nothing and is not consulted.
Nothing here imports the Redis client: with no Redis configured the shipped
model is all there is.
"""

from __future__ import annotations

from milterguard.checks.learning import pieces_of
from milterguard.checks.registry import check, preparer
from milterguard.learn import linear
from milterguard.model import Hits, Learned, Stage


def model_path(config) -> str:
    value = config["ml.default_model"]
    return linear.SHIPPED_MODEL if value == "builtin" else config.expand(value)


def _active(config) -> bool:
    return bool(config["ml.enabled"] and config["ml.default_model"])


@preparer("shipped_model")
def load_at_start(config) -> None:
    """Read the model once when the engine loads, before the workers fork (they share its pages)."""
    linear.shipped_model(model_path(config))


def fade(config, site_samples: int) -> float:
    """The share of its weight the shipped model keeps when the site's model learned SITE_SAMPLES messages."""
    limit = config["ml.default_fade"]
    if not limit:
        return 1.0
    return max(0.0, 1.0 - site_samples / limit)


@check(stage=Stage.EOM, emits=("ML_DEFAULT_SPAM", "ML_DEFAULT_HAM"), priority=62, after=("classifier",),
       active=_active)
def shipped_model(scan, hits: Hits) -> None:
    """Probability from the model shipped with milterguard, outweighed as the site's own model grows."""
    config = scan.config
    if scan.message is None:
        return
    site = scan.txn.facts.classifier
    share = fade(config, int(site.detail.get("samples", 0)) if site is not None else 0)
    if share <= 0.0:
        return
    model = linear.shipped_model(model_path(config))
    if model is None:
        return  # logged once when it could not be read
    prob = model.column_probability(linear.shipped_columns(scan.message, pieces_of(scan)))
    scan.txn.facts.default_classifier = Learned(prob, {"share": round(share, 3)})
    detail = "shipped model" + (f", {share:.0%} of its weight (the site's model is young)" if share < 1.0 else "")
    option = f"{prob:.3f}"
    if prob >= config["ml.spam_probability"]:
        hits.add("ML_DEFAULT_SPAM", option, where="learned", text=detail, factor=share * (prob - 0.5) / 0.5)
    elif prob <= config["ml.ham_probability"]:
        hits.add("ML_DEFAULT_HAM", option, where="learned", text=detail, factor=share * (0.5 - prob) / 0.5)
