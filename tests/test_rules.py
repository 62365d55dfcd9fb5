"""Rule files: schema errors with file:line, examples, composites, maps."""

from __future__ import annotations

import pytest

from milterguard.cli.lint import example_faults
from milterguard.config import load_config
from milterguard.engine.core import load_ruleset
from milterguard.ruleset import composite
from milterguard.ruleset.maps import MapFile
from milterguard.ruleset.rules import load_rules
from milterguard.yamlsrc import SourceError


def rules_from(tmp_path, text, name="local.yaml", **kw):
    path = tmp_path / name
    path.write_text(text)
    return load_rules([str(path)], **kw)


def test_shipped_rules_load_without_errors_and_examples_hold(tmp_path):
    rs = load_ruleset(load_config(etc_dir=tmp_path))
    assert rs.errors == []
    assert example_faults(rs) == []
    match_rules = [r for r in rs.rules.values() if r.kind == "match"]
    assert all(r.examples_hit and r.examples_miss for r in match_rules)
    assert len([r for r in rs.rules.values() if r.group not in ("engine", "canary")]) >= 40


def test_every_shipped_symbol_has_a_family_prefix_and_description(tmp_path):
    rs = load_ruleset(load_config(etc_dir=tmp_path))
    for rule in rs.rules.values():
        assert rule.description and rule.symbol.isupper()


def test_duplicate_symbol_is_refused_with_both_places(tmp_path):
    rs = rules_from(tmp_path, """
- symbol: A_ONE
  weight: 1
  description: one
  match: {body: 'x'}
- symbol: A_ONE
  weight: 2
  description: again
  match: {body: 'y'}
""")
    assert any("local.yaml:6" in e and "declared twice" in e and "local.yaml:2" in e for e in rs.errors)


def test_missing_description_is_refused(tmp_path):
    rs = rules_from(tmp_path, "- symbol: A_ONE\n  weight: 1\n  match: {body: x}\n")
    assert any("description is required" in e and "local.yaml:1" in e for e in rs.errors)


def test_bad_regex_reports_line(tmp_path):
    rs = rules_from(tmp_path, "- symbol: A_ONE\n  weight: 1\n  description: d\n  match: {body: '(?<=x)y'}\n")
    assert any("local.yaml:4" in e and "RE2" in e for e in rs.errors)


def test_unknown_key_and_target_are_refused(tmp_path):
    rs = rules_from(tmp_path, "- symbol: A_ONE\n  weight: 1\n  description: d\n  scroe: 2\n  match: {body: x}\n")
    assert any("local.yaml:4" in e and "scroe" in e for e in rs.errors)
    rs = rules_from(tmp_path, "- symbol: A_ONE\n  weight: 1\n  description: d\n  match: {bodyy: x}\n")
    assert any("exactly one of" in e for e in rs.errors)


def test_yaml_syntax_error_has_line(tmp_path):
    rs = rules_from(tmp_path, "- symbol: A\n  weight: [1\n")
    assert rs.errors and "local.yaml:" in rs.errors[0]


def test_local_rule_without_examples_is_a_warning_not_an_error(tmp_path):
    rs = rules_from(tmp_path, "- symbol: A_ONE\n  weight: 1\n  description: d\n  match: {body: x}\n")
    assert rs.errors == []
    assert any("no hit and miss examples" in w for w in rs.warnings)


def test_shipped_rule_without_examples_is_an_error(tmp_path):
    rs = rules_from(tmp_path, "- symbol: A_ONE\n  weight: 1\n  description: d\n  match: {body: x}\n", share_dir=tmp_path)
    assert any("needs hit and miss examples" in e for e in rs.errors)


def test_composite_unknown_symbol_and_loop(tmp_path):
    rs = rules_from(tmp_path, """
- symbol: C_ONE
  weight: 1
  description: d
  expr: "C_TWO & NOPE"
- symbol: C_TWO
  weight: 1
  description: d
  expr: "C_ONE"
""")
    assert any("unknown symbol NOPE" in e for e in rs.errors)
    assert any("composite loop" in e for e in rs.errors)


def test_check_symbols_must_be_declared_both_ways(tmp_path):
    rs = rules_from(tmp_path, "- symbol: ORPHAN\n  weight: 1\n  description: d\n", check_symbols={"OTHER": "mycheck"})
    assert any("ORPHAN has no match or expr" in e for e in rs.errors)
    assert any("emits OTHER" in e for e in rs.errors)


def test_expression_parser():
    node = composite.parse("A & (B | !C) & group:mail")
    assert composite.symbols(node) == {"A", "B", "C"}
    assert composite.groups(node) == {"mail"}
    hits = {"A", "B"}
    assert composite.evaluate(node, hits.__contains__, lambda g: g == "mail")
    assert not composite.evaluate(node, {"A", "C"}.__contains__, lambda g: True)
    for bad in ("A &", "(A | B", "A B", "a & B", "& A"):
        with pytest.raises(composite.ExprError):
            composite.parse(bad)


def test_map_file_kinds_and_errors(tmp_path):
    m = MapFile.parse("# comment\n10.0.0.0/8\n192.0.2.1\n2001:db8::/32\nuser@Example.org\n@bad.example\nspam.example # x\n")
    assert m.match_ip("10.9.8.7") == "10.0.0.0/8"
    assert m.match_ip("192.0.2.1") == "192.0.2.1"
    assert m.match_ip("192.0.2.2") is None
    assert m.match_ip("2001:db8:1::5") == "2001:db8::/32"
    assert m.match_email("USER@example.org") == "user@example.org"
    assert m.match_email("other@example.org") is None
    assert m.match_email("x@sub.bad.example") == "bad.example"
    assert m.match_domain("notspam.example") is None
    assert m.match_host("a.spam.example") == "spam.example"
    with pytest.raises(SourceError, match=r"<map>:2"):
        MapFile.parse("ok.example\nnot valid entry\n")


def test_map_rule_finds_map_in_maps_dir(tmp_path):
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "bad.map").write_text("203.0.113.0/24\n")
    rs = rules_from(tmp_path, """
- symbol: BAD_CLIENT
  weight: 1
  description: d
  match: {map: bad.map, key: client_ip}
  examples: {hit: ["203.0.113.9"], miss: ["198.51.100.1"]}
""", maps_dirs=[tmp_path / "maps"])
    assert rs.errors == []
    assert example_faults(rs) == []
    rs = rules_from(tmp_path, "- symbol: X_Y\n  weight: 1\n  description: d\n  match: {map: missing.map, key: helo}\n")
    assert any("missing.map" in e and "not found" in e for e in rs.errors)


def test_symbol_overrides_from_configuration(tmp_path):
    (tmp_path / "local.d").mkdir()
    (tmp_path / "local.d" / "s.yaml").write_text("symbols: {SUBJ_FREE: {weight: 7, state: testing}, SUBJ_ADV: {enabled: false}}\n")
    rs = load_ruleset(load_config(etc_dir=tmp_path))
    assert rs.rules["SUBJ_FREE"].weight == 7 and rs.rules["SUBJ_FREE"].state == "testing"
    assert not rs.rules["SUBJ_ADV"].enabled
