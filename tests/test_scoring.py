"""Scoring: weights, group caps, testing state, consumed symbols, fixed actions, domains, modes."""

from __future__ import annotations

from milterguard import scoring
from milterguard.config import load_config
from milterguard.model import Action, Hits, Stage
from milterguard.ruleset.rules import load_rules

RULES = """
- group: capped
  max_score: 5
- symbol: A_ONE
  group: capped
  weight: 4
  description: a
- symbol: A_TWO
  group: capped
  weight: 4
  description: b
- symbol: B_NEW
  weight: 3
  state: testing
  description: new rule, not counted yet
- symbol: C_NEG
  weight: -2
  description: good sign
- symbol: VIRUS_LIKE
  weight: 0
  action: reject
  description: fixed action
- symbol: COMBO
  weight: 1
  description: both
  expr: "A_ONE & C_NEG"
  consumes: [C_NEG]
"""


def setup(tmp_path, *sets):
    path = tmp_path / "r.yaml"
    path.write_text(RULES)
    checks = {s: "test" for s in ("A_ONE", "A_TWO", "B_NEW", "C_NEG", "VIRUS_LIKE")}
    rs = load_rules([str(path)], check_symbols=checks)
    assert rs.errors == []
    return rs, load_config(etc_dir=tmp_path, sets=list(sets))


def hits_of(*symbols):
    hits = Hits()
    hits._enter(Stage.EOM, "test", None)
    for s in symbols:
        hits.add(s)
    return hits


def test_group_cap_scales_the_group(tmp_path):
    rs, cfg = setup(tmp_path)
    v = scoring.score(hits_of("A_ONE", "A_TWO"), rs, cfg, [])
    assert v.score == 5.0
    assert all(abs(h.weight - 2.5) < 1e-9 and h.base_weight == 4 for h in v.hits)


def test_testing_rule_reported_but_not_counted(tmp_path):
    rs, cfg = setup(tmp_path)
    v = scoring.score(hits_of("B_NEW", "A_ONE"), rs, cfg, [])
    assert v.score == 4.0 and v.hit("B_NEW").weight == 0 and v.hit("B_NEW").state == "testing"


def test_consumed_symbol_counts_zero(tmp_path):
    rs, cfg = setup(tmp_path)
    v = scoring.score(hits_of("A_ONE", "C_NEG", "COMBO"), rs, cfg, [])
    assert v.hit("C_NEG").consumed_by == "COMBO" and v.hit("C_NEG").weight == 0
    assert v.score == 5.0


def test_thresholds_pick_action(tmp_path):
    rs, cfg = setup(tmp_path)
    assert scoring.score(hits_of("A_ONE"), rs, cfg, []).action == Action.TAG
    rs, cfg = setup(tmp_path, "thresholds.tag=2", "thresholds.review=3.5")
    assert scoring.score(hits_of("A_ONE"), rs, cfg, []).action == Action.REVIEW


def test_fixed_action_wins_over_score(tmp_path):
    rs, cfg = setup(tmp_path)
    v = scoring.score(hits_of("VIRUS_LIKE", "C_NEG"), rs, cfg, [])
    assert v.action == Action.REJECT and v.reason == "VIRUS_LIKE" and v.score == -2


def test_per_domain_thresholds_most_lenient_wins(tmp_path):
    (tmp_path / "local.d").mkdir()
    (tmp_path / "local.d" / "d.yaml").write_text("domains: {strict.example: {thresholds: {tag: 1, review: 2, reject: 3}}}\n")
    rs, cfg = setup(tmp_path)
    assert scoring.score(hits_of("A_ONE"), rs, cfg, ["strict.example"]).action == Action.REJECT
    assert scoring.score(hits_of("A_ONE"), rs, cfg, ["sub.strict.example"]).action == Action.REJECT
    mixed = scoring.score(hits_of("A_ONE"), rs, cfg, ["strict.example", "other.example"])
    assert mixed.action == Action.TAG


def test_modes(tmp_path):
    rs, cfg = setup(tmp_path, "actions.mode=shadow")
    v = scoring.score(hits_of("VIRUS_LIKE"), rs, cfg, [])
    assert v.action == Action.REJECT and v.applied == Action.ACCEPT
    rs, cfg = setup(tmp_path, "actions.mode=tag-only")
    v = scoring.score(hits_of("VIRUS_LIKE"), rs, cfg, [])
    assert v.applied == Action.TAG


def test_headers_render_from_verdict(tmp_path):
    rs, cfg = setup(tmp_path)
    v = scoring.score(hits_of("A_ONE"), rs, cfg, [])
    headers = dict(scoring.spam_headers(v))
    assert headers["X-Spam-Flag"] == "YES"
    assert headers["X-Spam-Score"] == "4.00"
    assert "action=tag" in headers["X-Spam-Status"]
    assert headers["X-Spam-Symbols"] == "A_ONE(4.00)"


def test_the_node_that_judged_is_named_in_a_header_unless_switched_off(tmp_path):
    from milterguard.model import Facts

    rs, cfg = setup(tmp_path, "node.name=mx-b")
    v = scoring.score(hits_of("A_ONE"), rs, cfg, [])
    edits = scoring.header_edits(v, Facts(), [("Subject", "hi")], cfg)
    assert ("X-Spam-Node", "mx-b") in edits.add
    # One that came with the message is removed with the other upstream X-Spam-* headers.
    edits = scoring.header_edits(v, Facts(), [("X-Spam-Node", "forged")], cfg)
    assert ("X-Spam-Node", 1) in edits.remove
    rs, cfg = setup(tmp_path, "node.name=mx-b", "headers.node=false")
    edits = scoring.header_edits(scoring.score(hits_of("A_ONE"), rs, cfg, []), Facts(), [], cfg)
    assert not [name for name, _value in edits.add if name == "X-Spam-Node"]
