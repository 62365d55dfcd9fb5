"""The shipped model, its provenance and rebuild, the weight files, and `evaluate --corpus`."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from milterguard.cli.shipped import build, corpus_samples, token_fingerprint
from milterguard.config import load_config
from milterguard.corpus import split_of
from milterguard.engine.core import Engine, RulesError
from milterguard.learn import linear
from milterguard.mail.raw import read_message
from milterguard.clients.redis_client import RedisStore
from milterguard.stores import models as ml
from support import REPO_ROOT, corpus_dir
from support.authmail import scan_local
from support.redis import redis_available
from support.redis_fixtures import master  # noqa: F401  (fixture)

needs_redis = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")
needs_corpus = pytest.mark.skipif(not (corpus_dir() / "modern").is_dir(), reason="the shared corpus is not there")


def engine_for(tmp_path, *sets: str) -> Engine:
    return Engine.load(load_config(etc_dir=tmp_path, sets=["dns.enabled=false", *sets]))


def scan(engine: Engine, raw: bytes):
    """No client address and no envelope sender: as `milterguard scan` of a file without a Return-Path."""
    return scan_local(engine, raw, mail_from="")


def test_shipped_model_file_matches_its_provenance():
    prov = json.loads(open(linear.SHIPPED_PROVENANCE, encoding="utf-8").read())
    with open(linear.SHIPPED_MODEL, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == prov["sha256"]
    model, header = linear.read_model(linear.SHIPPED_MODEL)
    assert model.samples == sum(c["spam"] + c["ham"] for c in prov["trained_on"].values())
    assert header["nonzero"] == prov["nonzero_weights"]
    assert {"modern", "spamassassin"} <= set(prov["licences"]) and all(prov["licences"].values())
    assert prov["command"].startswith("milterguard train --corpus")


def test_the_shipped_model_was_built_for_todays_tokens():
    # Tokens changed (learn/tokens.py, learn/linear.py): rebuild the model with the command of
    # docs/learning.md ("Rebuilding it"), then refit the weights.
    prov = json.loads(open(linear.SHIPPED_PROVENANCE, encoding="utf-8").read())
    assert token_fingerprint() == prov["token_fingerprint"], "the shipped model was built for other tokens: rebuild it"


@needs_corpus
def test_shipped_model_scores_without_redis_a_spam_above_a_ham(tmp_path):
    # Held-out messages (the test split): a modern phish and a list message with its list headers.
    corpus = corpus_dir() / "modern"
    spam = next(p for p in sorted((corpus / "spam").iterdir()) if split_of(str(p)) == "test")
    ham = next(p for p in sorted((corpus / "ham").iterdir()) if split_of(str(p)) == "test")
    engine = engine_for(tmp_path)
    v_spam, t_spam = scan(engine, read_message(str(spam)))
    v_ham, t_ham = scan(engine, read_message(str(ham)))
    p_spam, p_ham = t_spam.facts.default_classifier.probability, t_ham.facts.default_classifier.probability
    assert p_spam > 0.6 > 0.4 > p_ham, (p_spam, p_ham)
    assert "ML_DEFAULT_SPAM" in {h.symbol for h in v_spam.hits}
    assert "ML_DEFAULT_HAM" in {h.symbol for h in v_ham.hits}
    assert t_spam.facts.classifier is None and t_spam.facts.bayes is None  # no Redis: nothing else learned
    # Off by one setting.
    v_off, t_off = scan(engine_for(tmp_path, "ml.default_model="), read_message(str(spam)))
    assert t_off.facts.default_classifier is None and "ML_DEFAULT_SPAM" not in {h.symbol for h in v_off.hits}


def test_a_damaged_model_file_is_refused_and_the_filter_goes_on(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(linear.MAGIC + b"\x05\x00\x00\x00{}zz")
    with pytest.raises(ValueError, match="damaged"):
        linear.read_model(str(bad))
    raw = b"From: a@example.org\nSubject: hello\n\nhello there\n"
    verdict, txn = scan(engine_for(tmp_path, f"ml.default_model={bad}"), raw)
    assert txn.facts.default_classifier is None and verdict.action.name == "ACCEPT"


def _site_model(store: RedisStore, samples: int, sign: float) -> None:
    weights = np.full(ml.DIM, sign, dtype=np.float32)
    ml.publish(store, ml.Model(weights, 0.0, version=1, samples=samples))


@needs_redis
@needs_corpus
def test_the_sites_own_model_outweighs_the_shipped_one(tmp_path, master):  # noqa: F811
    spam = next(p for p in sorted((corpus_dir() / "modern" / "spam").iterdir()) if split_of(str(p)) == "test")
    raw = read_message(str(spam))
    sets = (f"redis.url={master.url}", "ml.default_fade=100", "ml.poll_interval=0")
    config = load_config(etc_dir=tmp_path, sets=["dns.enabled=false", *sets])
    store = RedisStore.from_config(config)
    # No model in Redis yet: the shipped model counts in full.
    verdict, txn = scan(Engine.load(config), raw)
    full = next(h.weight for h in verdict.hits if h.symbol == "ML_DEFAULT_SPAM")
    # A young site model (25 of 100 messages): three quarters of the weight.
    _site_model(store, 25, -1.0)
    verdict, txn = scan(engine_for(tmp_path, *sets), raw)
    assert txn.facts.classifier is not None and "ML_HAM" in {h.symbol for h in verdict.hits}
    young = next(h.weight for h in verdict.hits if h.symbol == "ML_DEFAULT_SPAM")
    assert young == pytest.approx(0.75 * full, rel=1e-3)
    # A grown one: the shipped model is not consulted at all; the site's model alone speaks.
    grown = (*sets, "redis.prefix=grown:")
    _site_model(RedisStore.from_config(load_config(etc_dir=tmp_path, sets=list(grown))), 100, -1.0)
    verdict, txn = scan(engine_for(tmp_path, *grown), raw)
    assert txn.facts.default_classifier is None
    assert not {"ML_DEFAULT_SPAM", "ML_DEFAULT_HAM"} & {h.symbol for h in verdict.hits}


def _mini_corpus(root, per_class: int) -> None:
    """A few messages of each class of both corpora, linked from the shared corpus."""
    for source, dirs in (("spamassassin", ("spam", "ham")), ("modern", ("spam", "ham"))):
        for d in dirs:
            (root / source / d).mkdir(parents=True)
            files = sorted((corpus_dir() / source / d).iterdir())
            for f in files[:per_class]:
                (root / source / d / f.name).symlink_to(f)
        (root / source / "SOURCE.md").symlink_to(corpus_dir() / source / "SOURCE.md")


@needs_corpus
def test_the_rebuild_is_deterministic(tmp_path):
    _mini_corpus(tmp_path / "c", 25)
    first = build(str(tmp_path / "c"), str(tmp_path / "a.bin"))
    second = build(str(tmp_path / "c"), str(tmp_path / "b.bin"))
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert first["sha256"] == second["sha256"] == hashlib.sha256((tmp_path / "a.bin").read_bytes()).hexdigest()
    train = [s for s in corpus_samples(str(tmp_path / "c")) if split_of(s.path) == "train"]
    assert sum(c["spam"] + c["ham"] for c in first["trained_on"].values()) == len(train)
    assert json.loads((tmp_path / "a.json").read_text())["sha256"] == first["sha256"]


def test_the_shipped_weight_file_is_valid_and_applies(tmp_path):
    engine = engine_for(tmp_path)
    shipped = {}
    for line in (REPO_ROOT / "rules" / "weights" / "learned.yaml").read_text().splitlines():
        if line and not line.startswith("#"):
            symbol, _, value = line.partition(":")
            shipped[symbol] = float(value)
    assert shipped and all(symbol in engine.ruleset.rules for symbol in shipped)
    assert all(engine.ruleset.rules[s].weight == w for s, w in shipped.items())
    # The symbols: setting still wins over it.
    symbol = next(iter(shipped))
    engine = engine_for(tmp_path, f"symbols.{symbol}.weight=0.25")
    assert engine.ruleset.rules[symbol].weight == 0.25


def test_a_bad_weight_file_is_an_error_with_its_place(tmp_path):
    (tmp_path / "weights.d").mkdir()
    (tmp_path / "weights.d" / "w.yaml").write_text("SUBJ_ALL_CAPS: 1.5\nNO_SUCH_SYMBOL: 2\nSUBJ_FREE: lots\n")
    with pytest.raises(RulesError) as err:
        engine_for(tmp_path)
    text = "\n".join(err.value.errors)
    assert "w.yaml:2" in text and "NO_SUCH_SYMBOL" in text
    assert "w.yaml:3" in text and "SUBJ_FREE" in text


@needs_redis
@needs_corpus
def test_evaluate_reports_out_of_the_box_trained_and_the_time_split(tmp_path):
    _mini_corpus(tmp_path / "c", 30)
    done = subprocess.run([sys.executable, "-m", "milterguard", "evaluate", "--etc-dir", str(tmp_path),
                           "--corpus", str(tmp_path / "c"), "--json"],
                          capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    settings = {(r["corpus"], r["setting"]) for r in rows}
    for corpus in ("spamassassin", "modern", "modern, newest quarter by Date"):
        assert (corpus, "out of the box") in settings and (corpus, "trained") in settings
    assert ("modern", "out of the box, ham without list headers") in settings
    for r in rows:
        assert r["spam"] and r["ham"] and 0 <= r["ham_held"] <= r["ham"] and 0.5 <= r["auc"] <= 1.0
    modern = next(r for r in rows if r["setting"] == "out of the box" and r["corpus"] == "modern")
    assert modern["spam_held"] > modern["ham_held"]
    # modern/ lost its Received headers when it was collected: RCVD_NONE is not counted there;
    # the SpamAssassin messages kept theirs.
    for r in rows:
        assert r["not_counted"] == ([] if r["corpus"] == "spamassassin" else ["RCVD_NONE"]), r
    table = subprocess.run([sys.executable, "-m", "milterguard", "evaluate", "--etc-dir", str(tmp_path),
                            "--corpus", str(tmp_path / "c")], capture_output=True, text=True, timeout=600,
                           cwd=REPO_ROOT)
    assert table.returncode == 0, table.stderr
    assert "modern: no message has a Received header" in table.stdout and "RCVD_NONE not counted" in table.stdout
    assert "spamassassin: no message" not in table.stdout


def test_a_corpus_without_received_headers_leaves_out_the_trail_symbols(tmp_path):
    from milterguard.cli.evaluate_corpus import has_trail, trail_sets

    bare = tmp_path / "bare.eml"
    bare.write_bytes(b"From: a@example.org\nSubject: hi\nX-Received-Note: not a trail\n\nReceived: in the body\n")
    kept = tmp_path / "kept.eml"
    kept.write_bytes(b"From: a@example.org\nreceived: from mx.example.org by mx.example.net; "
                     b"Mon, 7 Dec 2026 06:00:00 +0000\nSubject: hi\n\nbody\n")
    assert not has_trail([str(bare)]) and has_trail([str(bare), str(kept)])
    assert trail_sets([str(bare)]) == ["symbols.RCVD_NONE.enabled=false"]
    assert trail_sets([str(bare), str(kept)]) == []
    # The setting it makes takes the symbol out of the score.
    raw = bare.read_bytes()
    counted, _ = scan(engine_for(tmp_path), raw)
    left_out, _ = scan(engine_for(tmp_path, *trail_sets([str(bare)])), raw)
    assert "RCVD_NONE" in {h.symbol for h in counted.hits}
    assert "RCVD_NONE" not in {h.symbol for h in left_out.hits}


def test_the_weight_file_was_fitted_for_the_default_fade():
    from milterguard import settings as S

    text = (REPO_ROOT / "rules" / "weights" / "learned.yaml").read_text()
    fitted = [line.rsplit(":", 1)[1].strip() for line in text.splitlines()
              if line.startswith("# Fitted for ml.default_fade:")]
    assert fitted == [str(S.BY_KEY["ml.default_fade"].default)]
