"""The command line: each subcommand through `milterguard.cli.main([...])`.

Every call names an empty `--etc-dir`, so that nothing from /etc/milterguard
leaks in; the shipped rules and defaults come from the checkout.  The last
test runs the installed console scripts as separate processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

from milterguard import __version__
from milterguard import config as cfgmod
from milterguard.cli import COMMANDS, main

CORPUS = Path(os.environ.get("MILTERGUARD_CORPUS", "/work/shared/corpus/spamassassin"))

HAM = b"""\
Return-Path: <alice@example.org>
Received: from mail.example.org (mail.example.org [198.51.100.20])
\tby mx.example.net with ESMTP id 4XyZ1; Mon, 2 Sep 2002 10:00:05 +0100
From: Alice Example <alice@example.org>
To: Bob <bob@example.net>
Subject: Notes from the Tuesday call
Date: Mon, 2 Sep 2002 10:00:00 +0100
Message-ID: <20020902100000.1234@mail.example.org>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii

Hi Bob,

here are the notes from Tuesday. The build is green again.

Alice
"""

CANARY = HAM.replace(b"The build is green again.", b"MILTERGUARD-CANARY-REJECT")


@pytest.fixture(autouse=True)
def _no_etc_from_environment(monkeypatch):
    monkeypatch.delenv("MILTERGUARD_ETC_DIR", raising=False)


@pytest.fixture
def etc(tmp_path):
    """An empty configuration directory."""
    path = tmp_path / "etc"
    path.mkdir()
    return path


@pytest.fixture
def messages(tmp_path):
    """A plain message and one with the reject canary string."""
    folder = tmp_path / "mail"
    folder.mkdir()
    (folder / "ham.eml").write_bytes(HAM)
    (folder / "canary.eml").write_bytes(CANARY)
    return folder


def corpus_files(kind: str, count: int) -> list[Path]:
    folder = CORPUS / kind
    if not folder.is_dir():
        pytest.skip(f"no corpus at {folder} (set MILTERGUARD_CORPUS)")
    return sorted(folder.glob("*.eml"))[:count]


class DnsListener:
    """A UDP socket on loopback named as the only name server; it never answers."""

    def __init__(self, sock) -> None:
        self.sock = sock
        self.sets = ("--set", f"dns.nameservers=127.0.0.1:{sock.getsockname()[1]}",
                     "--set", "dns.timeout=0.1", "--set", "dns.message_budget=0.2")

    def queries(self) -> list[tuple[str, int]]:
        """(name, type) of each query received since the last call."""
        import struct

        found = []
        while True:
            try:
                packet = self.sock.recv(4096)
            except TimeoutError:
                return found
            labels, at = [], 12
            while packet[at]:
                labels.append(packet[at + 1:at + 1 + packet[at]].decode("ascii", "replace"))
                at += 1 + packet[at]
            found.append((".".join(labels), struct.unpack("!H", packet[at + 1:at + 3])[0]))


@pytest.fixture
def dns_listener():
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.05)
        yield DnsListener(sock)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


# ---------------------------------------------------------------- main


def test_no_subcommand_prints_help_and_fails(capsys):
    status, out, err = run(capsys)
    assert status == 2
    assert "usage: milterguard" in err
    for name in COMMANDS:
        assert name in err


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"milterguard {__version__}"


def test_missing_config_file_is_an_error(capsys, etc, tmp_path):
    status, out, err = run(capsys, "config", "dump", "--etc-dir", str(etc), "--config", str(tmp_path / "nope.yaml"))
    assert status == 2
    assert "nope.yaml" in err and "does not exist" in err


def test_options_go_before_or_after_arguments(capsys, etc):
    # An option between two positionals of a command, as argparse users expect.
    status, out, err = run(capsys, "list", "add", "allow", "--domain", "example.net", "friend.example",
                           "--etc-dir", str(etc))
    assert status == 0, err
    assert out == f"friend.example added to {etc / 'lists' / 'example.net' / 'allow.map'}\n"
    status, out, err = run(capsys, "list", "--etc-dir", str(etc), "show", "--domain", "example.net", "allow")
    assert status == 0, err
    assert out.splitlines()[1:] == ["friend.example"]


def test_a_usage_error_names_the_command(capsys, etc):
    with pytest.raises(SystemExit) as exc:
        main(["list", "add", "--etc-dir", str(etc), "allow", "--no-such-option"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("usage: milterguard list ")


# ---------------------------------------------------------------- scan


def test_scan_json_of_a_plain_message(capsys, etc, messages):
    path = messages / "ham.eml"
    status, out, err = run(capsys, "scan", "--json", "--etc-dir", str(etc), str(path))
    assert status == 0, err
    lines = out.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["file"] == str(path)
    assert record["action"] == "accept"
    assert record["score"] < record["thresholds"]["tag"]
    assert record["thresholds"] == {"tag": 4.0, "review": 6.0, "reject": 15.0}
    assert {"score", "action", "applied", "mode", "reason", "stage", "symbols", "timings_ms", "elapsed_ms"} <= set(record)
    assert all(s["name"] != "CANARY_REJECT" for s in record["symbols"])


def test_scan_json_of_the_reject_canary(capsys, etc, messages):
    status, out, err = run(capsys, "scan", "--json", "--etc-dir", str(etc), str(messages / "canary.eml"))
    assert status == 0, err
    record = json.loads(out)
    assert record["action"] == "reject"
    assert record["reason"] == "CANARY_REJECT"
    hit = next(s for s in record["symbols"] if s["name"] == "CANARY_REJECT")
    assert hit["group"] == "canary"
    assert hit["text"] == "MILTERGUARD-CANARY-REJECT"
    assert hit["source"].rsplit(":", 1)[0].endswith(os.path.join("rules", "core.yaml"))
    assert hit["source"].rsplit(":", 1)[1].isdigit()


def test_scan_explain_shows_symbol_place_and_total(capsys, etc, messages):
    path = messages / "canary.eml"
    status, out, err = run(capsys, "scan", "--explain", "--etc-dir", str(etc), str(path))
    assert status == 0, err
    assert out.startswith(f"== {path}\n")
    line = next(x for x in out.splitlines() if x.startswith("CANARY_REJECT"))
    assert "canary" in line and "core.yaml:" in line and "[action reject]" in line
    assert "Body carries the reject canary string" in out
    assert "matched 'MILTERGUARD-CANARY-REJECT'" in out
    assert "total 0.00 -> reject, forced by CANARY_REJECT (tag 4, review 6, reject 15)" in out
    assert "\ntime: " in out


def test_scan_a_directory_prints_one_line_per_message(capsys, etc, messages):
    status, out, err = run(capsys, "scan", "--etc-dir", str(etc), str(messages))
    assert status == 0, err
    rows = [line.split("\t") for line in out.splitlines()]
    assert [Path(r[0]).name for r in rows] == ["canary.eml", "ham.eml"]
    assert rows[0][2] == "reject" and rows[1][2] == "accept"


def test_scan_envelope_options_reach_the_checks(capsys, etc, messages):
    status, out, err = run(capsys, "scan", "--json", "--etc-dir", str(etc), "--ip", "198.51.100.7",
                           "--helo", "198.51.100.7", "--rcpt", "bob@example.net", str(messages / "ham.eml"))
    assert status == 0, err
    names = {s["name"] for s in json.loads(out)["symbols"]}
    assert {"RDNS_NONE", "HELO_BARE_IP"} <= names


def test_scan_set_flag_changes_the_outcome(capsys, etc, messages):
    status, out, err = run(capsys, "scan", "--json", "--etc-dir", str(etc), "--set", "actions.mode=shadow",
                           str(messages / "canary.eml"))
    assert status == 0, err
    record = json.loads(out)
    assert record["action"] == "reject" and record["applied"] == "accept" and record["mode"] == "shadow"


def test_scan_of_a_corpus_spam_message(capsys, etc):
    (path,) = corpus_files("spam", 1)
    status, out, err = run(capsys, "scan", "--json", "--etc-dir", str(etc), str(path))
    assert status == 0, err
    record = json.loads(out)
    assert record["symbols"], "a 2002 spam message hits no rule at all"
    assert record["score"] == pytest.approx(sum(s["weight"] for s in record["symbols"]), abs=0.02)
    status, out, err = run(capsys, "scan", "--explain", "--etc-dir", str(etc), str(path))
    assert status == 0, err
    assert out.startswith(f"== {path}\n")
    assert f"total {record['score']:.2f} -> {record['action']}" in out


def test_scan_ip_looks_up_through_the_configured_servers_only(capsys, etc, messages, dns_listener):
    # No reverse look-up of --ip (the client name is [IP] unless --client-name says otherwise),
    # and no look-up at all with DNS off; the loopback_only fixture catches the system's resolver.
    common = ("scan", "--json", "--etc-dir", str(etc), "--ip", "198.51.100.7", str(messages / "ham.eml"),
              *dns_listener.sets)
    status, out, err = run(capsys, *common, "--set", "dns.enabled=false")
    assert status == 0, err
    assert dns_listener.queries() == []
    status, out, err = run(capsys, *common)
    assert status == 0, err
    queries = dns_listener.queries()
    assert ("example.org", 16) in queries  # the sender's SPF record, TXT
    assert all(qtype != 12 for _, qtype in queries), queries  # no PTR
    assert "RDNS_NONE" in {s["name"] for s in json.loads(out)["symbols"]}


def test_scan_missing_file_is_status_2(capsys, etc, tmp_path):
    status, out, err = run(capsys, "scan", "--etc-dir", str(etc), str(tmp_path / "missing.eml"))
    assert status == 2
    assert "missing.eml" in err


@pytest.mark.parametrize("command", [["learn", "--spam"], ["evaluate", "--ham", "{tmp}", "--spam"],
                                     ["fuzzy", "add"]])
def test_a_missing_message_file_is_one_line_and_status_2(capsys, etc, tmp_path, command):
    """Any command reading messages: a path that is not there is named, without a traceback."""
    missing = tmp_path / "missing.eml"
    args = [word.replace("{tmp}", str(tmp_path)) for word in command]
    status, out, err = run(capsys, *args, str(missing), "--etc-dir", str(etc),
                           "--set", "redis.url=redis://127.0.0.1:9/0")
    assert (status, err) == (2, f"milterguard: {missing}: No such file or directory\n")


def test_scan_of_an_empty_directory_says_so_and_fails(capsys, etc, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    status, out, err = run(capsys, "scan", "--etc-dir", str(etc), str(empty))
    assert status == 2
    assert out == ""
    assert err == f"milterguard: no messages in {empty}\n"


# ---------------------------------------------------------------- lint


def test_lint_of_the_shipped_rules_passes(capsys, etc):
    status, out, err = run(capsys, "lint", "--etc-dir", str(etc))
    assert status == 0, out
    assert "error:" not in out
    assert ", 0 errors, " in err


BROKEN = """\
- symbol: LOCAL_GOOD
  description: A correct local rule
  weight: 1
  match: {header: Subject, regex: 'lottery winner'}
  examples: {hit: ["You are our lottery winner"], miss: ["Lottery rules changed"]}

- symbol: LOCAL_LOOKAHEAD
  description: RE2 has no lookahead
  weight: 1
  match: {body: 'foo(?=bar)'}

- symbol: LOCAL_NO_WEIGHT
  description: The weight is missing
  match: {body: 'x'}
"""


def test_lint_of_a_broken_rule_file_reports_file_and_line(capsys, etc, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    status, out, err = run(capsys, "lint", "--etc-dir", str(etc), str(path))
    assert status == 1
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert any(f"{path}:10:" in e and "LOCAL_LOOKAHEAD" in e and "RE2" in e for e in errors), out
    assert any(f"{path}:12:" in e and "LOCAL_NO_WEIGHT" in e for e in errors), out
    assert not any("LOCAL_GOOD" in e for e in errors)
    assert "2 errors" in err


def test_lint_example_that_does_not_hit_is_an_error(capsys, etc):
    rules = etc / "rules.d"
    rules.mkdir()
    (rules / "local.yaml").write_text(
        "- symbol: LOCAL_BAD_EXAMPLE\n"
        "  description: The hit example does not hit\n"
        "  weight: 1\n"
        "  match: {header: Subject, regex: 'xyz'}\n"
        "  examples: {hit: ['abc'], miss: ['def']}\n"
    )
    status, out, err = run(capsys, "lint", "--etc-dir", str(etc))
    assert status == 1
    assert f"error: {rules / 'local.yaml'}:1: LOCAL_BAD_EXAMPLE: hit example 'abc' does not hit" in out


def test_lint_warning_fails_only_with_strict(capsys, etc, tmp_path):
    path = tmp_path / "noexamples.yaml"
    path.write_text("- symbol: LOCAL_NO_EXAMPLES\n  description: No examples\n  weight: 1\n"
                    "  match: {header: Subject, regex: 'xyz'}\n")
    status, out, err = run(capsys, "lint", "--etc-dir", str(etc), str(path))
    assert status == 0
    assert f"warning: {path}:1: LOCAL_NO_EXAMPLES: no hit and miss examples" in out
    status, out, err = run(capsys, "lint", "--strict", "--etc-dir", str(etc), str(path))
    assert status == 1


def test_lint_of_a_file_with_a_hyphen_reports_the_real_fault_once(capfd, etc, tmp_path):
    # The default group comes from the file name, made into a valid group name; a bad
    # regex is one file:line error, without RE2's own log lines on stderr.
    path = tmp_path / "my-rules.yaml"
    path.write_text(
        "- symbol: LOCAL_LOOKAHEAD\n"
        "  description: RE2 has no lookahead\n"
        "  weight: 1\n"
        "  match: {body: 'foo(?=bar)'}\n"
        "  examples: {hit: [foobar], miss: [foo]}\n"
    )
    status = main(["lint", "--etc-dir", str(etc), str(path)])
    out, err = capfd.readouterr()
    assert status == 1
    assert "group" not in out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {path}:4: LOCAL_LOOKAHEAD: regex not accepted by RE2 "
                      "(no lookaround or backreferences): invalid perl operator: (?="]
    assert err.splitlines()[-1].endswith(" 1 errors, 0 warnings"), err
    assert len(err.splitlines()) == 1, err


def test_rules_of_a_file_with_a_hyphen_are_in_its_group(capsys, etc, messages):
    (etc / "rules.d").mkdir()
    (etc / "rules.d" / "10-my-rules.yaml").write_text(
        "- symbol: LOCAL_HELLO\n  description: Says hello\n  weight: 0.5\n"
        "  match: {body: 'Hi Bob'}\n  examples: {hit: [Hi Bob], miss: [Bye]}\n"
    )
    status, out, err = run(capsys, "scan", "--json", "--etc-dir", str(etc), str(messages / "ham.eml"))
    assert status == 0, err
    hit = next(s for s in json.loads(out)["symbols"] if s["name"] == "LOCAL_HELLO")
    assert hit["group"] == "my_rules"


def test_lint_counts_a_file_with_a_yaml_syntax_error(capsys, etc, tmp_path):
    path = tmp_path / "unclosed.yaml"
    path.write_text("- symbol: LOCAL_X\n  description: [unclosed\n")
    status, out, err = run(capsys, "lint", "--etc-dir", str(etc))
    shipped_files = int(err.split()[0])
    status, out, err = run(capsys, "lint", "--etc-dir", str(etc), str(path))
    assert status == 1
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {path}:2: YAML syntax error: "), errors
    assert "expected ',' or ']'" in errors[0]
    assert err.startswith(f"{shipped_files + 1} rule files, ")


def test_lint_missing_path_is_status_2(capsys, etc, tmp_path):
    status, out, err = run(capsys, "lint", "--etc-dir", str(etc), str(tmp_path / "nope.yaml"))
    assert status == 2
    assert "nope.yaml: no such file" in err


# ---------------------------------------------------------------- config


def test_config_dump_origin_names_the_local_d_line(capsys, etc):
    local = etc / "local.d"
    local.mkdir()
    (local / "scoring.yaml").write_text("# tuning\nthresholds:\n  reject: 12\nactions: {mode: tag-only}\n")
    status, out, err = run(capsys, "config", "dump", "--origin", "--etc-dir", str(etc))
    assert status == 0, err
    lines = out.splitlines()
    # Each key of a merged mapping has its own origin: local.d set only thresholds.reject.
    assert f"thresholds.reject: 12.0    # {local / 'scoring.yaml'}:3" in lines
    shipped = cfgmod.find_share_dir() / "conf" / "milterguard.yaml"
    # The shipped file is generated: its thresholds line moves as settings are added.
    at = next(n for n, line in enumerate(shipped.read_text().splitlines(), 1) if line.startswith("thresholds:"))
    assert [line for line in lines if line.startswith("thresholds")] == [
        f"thresholds.reject: 12.0    # {local / 'scoring.yaml'}:3",
        f"thresholds.review: 6.0    # {shipped}:{at}",
        f"thresholds.tag: 4.0    # {shipped}:{at}",
    ]
    assert f"actions.mode: tag-only    # {local / 'scoring.yaml'}:4" in lines
    shipped = next(line for line in lines if line.startswith("milter.socket:"))
    assert shipped.startswith("milter.socket: 'inet:11339@127.0.0.1'    # ")
    assert os.path.join("conf", "milterguard.yaml:") in shipped


def test_config_dump_set_flag_origin(capsys, etc):
    status, out, err = run(capsys, "config", "dump", "--origin", "--etc-dir", str(etc), "--set", "milter.workers=2")
    assert status == 0, err
    assert "milter.workers: 2    # --set" in out.splitlines()


def test_config_dump_without_origin_is_yaml(capsys, etc):
    import yaml

    status, out, err = run(capsys, "config", "dump", "--etc-dir", str(etc))
    assert status == 0, err
    data = yaml.safe_load(out)
    assert data["thresholds"] == {"reject": 15.0, "review": 6.0, "tag": 4.0}
    assert data["milter.socket"] == "inet:11339@127.0.0.1"


def test_config_error_names_file_and_line(capsys, etc):
    local = etc / "local.d"
    local.mkdir()
    (local / "typo.yaml").write_text("actions:\n  mdoe: shadow\n")
    status, out, err = run(capsys, "config", "dump", "--etc-dir", str(etc))
    assert status == 2
    assert f"{local / 'typo.yaml'}:2" in err and "unknown setting 'actions.mdoe'" in err


def test_config_doc_is_the_reference_page(capsys, etc):
    status, out, err = run(capsys, "config", "doc", "--etc-dir", str(etc))
    assert status == 0
    assert out == cfgmod.reference_markdown()
    assert out.startswith("# Configuration reference\n")
    assert "### `milter.socket`" in out


def test_config_defaults_is_the_shipped_file(capsys, etc):
    status, out, err = run(capsys, "config", "defaults", "--etc-dir", str(etc))
    assert status == 0
    assert out == (cfgmod.find_share_dir() / "conf" / "milterguard.yaml").read_text()


# ---------------------------------------------------------------- corpus


@pytest.fixture
def small_corpus(tmp_path):
    spam, ham = tmp_path / "spam", tmp_path / "ham"
    spam.mkdir()
    ham.mkdir()
    for path in corpus_files("spam", 3):
        shutil.copy(path, spam / path.name)
    for path in corpus_files("ham", 3):
        shutil.copy(path, ham / path.name)
    return spam, ham


def test_corpus_json_counts_and_rates(capsys, etc, small_corpus):
    spam, ham = small_corpus
    status, out, err = run(capsys, "corpus", "--etc-dir", str(etc), "--spam", str(spam), "--ham", str(ham),
                           "--split", "all", "--jobs", "1", "--json")
    assert status == 0, err
    data = json.loads(out)
    summary = data["summary"]
    assert (summary["split"], summary["spam"], summary["ham"]) == ("all", 3, 3)
    assert summary["spam_tagged"] >= summary["spam_review"] >= summary["spam_rejected"]
    assert data["symbols"], "no symbol hit six real messages"
    for row in data["symbols"]:
        assert row["spam"] + row["ham"] >= 1
        assert row["spam_pct"] == pytest.approx(100 * row["spam"] / 3, abs=0.01)
        assert 0.0 <= row["so"] <= 1.0


def test_corpus_text_with_an_extra_rule_file(capsys, etc, small_corpus, tmp_path):
    spam, ham = small_corpus
    new = tmp_path / "new.yaml"
    new.write_text(
        "- symbol: LOCAL_ANY_SUBJECT\n"
        "  description: Every message with a Subject (for the test)\n"
        "  weight: 0.1\n"
        "  state: testing\n"
        "  match: {header: Subject, regex: '.'}\n"
        "  examples: {hit: ['x'], miss: ['']}\n"
    )
    status, out, err = run(capsys, "corpus", str(new), "--etc-dir", str(etc), "--spam", str(spam),
                           "--ham", str(ham), "--split", "all", "--jobs", "1")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["symbol", "weight", "spam%", "ham%", "S/O", "overlap"]
    rows = [line for line in lines[1:] if line and not line.startswith("all split")]
    assert len(rows) == 1 and rows[0].startswith("LOCAL_ANY_SUBJECT")
    assert "all split: 3 spam, 3 ham;" in out


def test_corpus_markdown_table_matches_the_json(capsys, etc, small_corpus):
    spam, ham = small_corpus
    common = ("corpus", "--etc-dir", str(etc), "--spam", str(spam), "--ham", str(ham), "--split", "all", "--jobs", "1")
    status, out, err = run(capsys, *common, "--json")
    assert status == 0, err
    rows = {r["symbol"]: r for r in json.loads(out)["symbols"]}
    status, out, err = run(capsys, *common, "--markdown")
    assert status == 0, err
    assert out.startswith("all split: 3 spam, 3 ham.")
    table = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and line.count("|") == 7]
    assert table[0][0].strip() == "symbol"
    listed = {cells[0].strip(): cells for cells in table[1:]}
    assert set(listed) == set(rows)
    for name, cells in listed.items():
        assert float(cells[2]) == pytest.approx(rows[name]["spam_pct"], abs=0.01)
        assert float(cells[3]) == pytest.approx(rows[name]["ham_pct"], abs=0.01)


@pytest.fixture
def split_corpus(tmp_path):
    """Ten ham messages, some in the train and some in the test split; the names of each split."""
    from milterguard.corpus import split_of

    ham = tmp_path / "ten"
    ham.mkdir()
    names = {"train": [], "test": []}
    for i in range(10):
        (ham / f"m{i}.eml").write_bytes(HAM)
        names[split_of(f"m{i}.eml")].append(f"m{i}.eml")
    assert names["train"] and names["test"]
    return ham, names


def test_corpus_takes_every_message_unless_a_split_is_asked(capsys, etc, split_corpus):
    ham, names = split_corpus
    common = ("corpus", "--etc-dir", str(etc), "--ham", str(ham), "--jobs", "1")
    status, out, err = run(capsys, *common)
    assert status == 0, err
    assert "\nall split: 0 spam, 10 ham; " in out
    status, out, err = run(capsys, *common, "--json")
    assert json.loads(out)["summary"]["ham"] == 10
    for split in ("train", "test"):
        n = len(names[split])
        status, out, err = run(capsys, *common, "--split", split)
        assert status == 0, err
        assert f"\n{split} split: 0 spam, {n} ham ({n} of 10 messages); " in out
        status, out, err = run(capsys, *common, "--split", split, "--markdown")
        assert out.startswith(f"{split} split: 0 spam, {n} ham ({n} of 10 messages).\n")
        status, out, err = run(capsys, *common, "--split", split, "--json")
        summary = json.loads(out)["summary"]
        assert (summary["split"], summary["ham"], summary["found"]) == (split, n, 10)


def test_corpus_without_messages_says_so(capsys, etc, tmp_path):
    status, out, err = run(capsys, "corpus", "--etc-dir", str(etc), "--ham", str(tmp_path))
    assert status == 2
    assert err == f"milterguard: no messages under {tmp_path}\n"


def test_corpus_needs_a_spam_or_ham_dir(capsys, etc):
    status, out, err = run(capsys, "corpus", "--etc-dir", str(etc))
    assert status == 2
    assert "--spam" in err


# ---------------------------------------------------------------- bench


def test_bench_two_messages_one_round(capsys, etc, messages):
    status, out, err = run(capsys, "bench", "--etc-dir", str(etc), "--rounds", "1", "--json",
                           str(messages / "ham.eml"), str(messages / "canary.eml"))
    assert status == 0, err
    result = json.loads(out)
    assert result["messages"] == 2
    assert result["per_second"] > 0
    assert 0 < result["p50_ms"] <= result["max_ms"]
    assert result["rss_mib_end"] > 0
    status, out, err = run(capsys, "bench", "--etc-dir", str(etc), "--rounds", "1", str(messages))
    assert status == 0, err
    assert out.startswith("2 messages in one process: ")


def test_bench_with_and_without_metrics(capsys, etc, messages):
    status, out, err = run(capsys, "bench", "--etc-dir", str(etc), "--rounds", "2", "--json", "--metrics",
                           str(messages / "ham.eml"), str(messages / "canary.eml"))
    assert status == 0, err
    result = json.loads(out)
    assert result["off"]["messages"] == result["on"]["messages"] == 4
    assert "cost_us_per_message" in result and "cost_percent" in result
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ  # left as it was
    status, out, err = run(capsys, "bench", "--etc-dir", str(etc), "--rounds", "1", "--metrics", str(messages))
    assert status == 0, err
    assert out.startswith("metrics off: 2 messages") and "recording cost:" in out


def test_bench_makes_no_dns_lookup_unless_asked(capsys, etc, messages, dns_listener):
    common = ("bench", "--etc-dir", str(etc), "--rounds", "1", "--json", str(messages / "ham.eml"),
              *dns_listener.sets)
    status, out, err = run(capsys, *common)
    assert status == 0, err
    assert dns_listener.queries() == []
    status, out, err = run(capsys, *common, "--dns")
    assert status == 0, err
    assert dns_listener.queries()


# ---------------------------------------------------------------- serve


def test_serve_refuses_broken_rules(capsys, etc):
    (etc / "rules.d").mkdir()
    (etc / "rules.d" / "bad.yaml").write_text("- symbol: lower_case\n  description: x\n  weight: 1\n")
    status, out, err = run(capsys, "serve", "--etc-dir", str(etc), "--socket", "inet:1@127.0.0.1")
    assert status == 2
    assert "rule errors" in err and f"{etc / 'rules.d' / 'bad.yaml'}:1" in err


# ---------------------------------------------------------------- start-up


def test_commands_print_no_warnings_of_the_libraries(tmp_path, messages):
    # dnspython's DNSSEC module made cryptography warn that DSA is deprecated, eight
    # lines at the top of every command that loads the checks.
    for argv in (["--version"], ["lint", "--etc-dir", str(tmp_path)],
                 ["scan", "--etc-dir", str(tmp_path), str(messages / "ham.eml")]):
        done = subprocess.run([sys.executable, "-m", "milterguard", *argv], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "Warning" not in done.stderr, done.stderr


def modules_after(argv: list[str], cwd: Path) -> set[str]:
    """The modules a fresh interpreter has imported once `milterguard ARGV` has run."""
    script = ("import json, sys\nfrom milterguard.cli import main\ntry:\n    main(json.loads(sys.argv[1]))\n"
              "except SystemExit:\n    pass\nprint(json.dumps(sorted(sys.modules)), file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script, json.dumps(argv)], capture_output=True, text=True,
                          timeout=120, cwd=cwd)
    return set(json.loads(done.stderr.splitlines()[-1]))


HEAVY = {"redis", "numpy", "sklearn", "scipy", "checkdmarc"}


def test_start_up_imports_only_what_the_command_needs(tmp_path, messages):
    # --version and --help import no command; a scan without Redis imports neither the
    # Redis client nor numpy, and no DMARC record means no checkdmarc.
    for argv in (["--version"], ["--help"]):
        found = modules_after(argv, tmp_path)
        assert not {m for m in found if m.startswith("milterguard.cli.")}, argv
        assert not found & HEAVY, argv
    found = modules_after(["scan", "--help"], tmp_path)
    assert {m for m in found if m.startswith("milterguard.cli.")} <= {"milterguard.cli.scan", "milterguard.cli.common"}
    found = modules_after(["scan", "--etc-dir", str(tmp_path), str(messages / "ham.eml")], tmp_path)
    assert "milterguard.checks.dmarc" in found
    assert not found & HEAVY, found & HEAVY


# ---------------------------------------------------------------- installed scripts


def console_scripts() -> list[tuple[str, Path]]:
    """Every console script the installed distribution declares, with its path."""
    try:
        dist = metadata.distribution("milterguard")
    except metadata.PackageNotFoundError:
        pytest.fail("milterguard is not installed in this environment; tests/run.sh installs it (pip install -e .)")
    scripts = []
    for ep in dist.entry_points:
        if ep.group != "console_scripts":
            continue
        candidates = [Path(sysconfig.get_path("scripts")) / ep.name, Path(sys.executable).parent / ep.name]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None and shutil.which(ep.name):
            found = Path(shutil.which(ep.name))
        assert found is not None, f"console script {ep.name} is declared but not installed"
        scripts.append((ep.name, found))
    return scripts


def test_every_console_script_runs(tmp_path):
    scripts = console_scripts()
    assert [name for name, _ in scripts] == ["milterguard"]
    env = {k: v for k, v in os.environ.items() if k != "MILTERGUARD_ETC_DIR"}
    for name, path in scripts:
        done = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=60,
                              cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"usage: {name}")
        for sub in COMMANDS:
            done = subprocess.run([str(path), sub, "--help"], capture_output=True, text=True, timeout=60,
                                  cwd=tmp_path, env=env)
            assert done.returncode == 0, f"{name} {sub} --help: {done.stderr}"
            assert "--etc-dir" in done.stdout
        done = subprocess.run([str(path), "lint", "--etc-dir", str(tmp_path)], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert ", 0 errors, " in done.stderr


def test_lint_checks_the_whole_configuration(capsys, etc):
    """As the unit's ExecReload runs it before SIGHUP: a broken setting in any layer fails
    lint with its file and line, so the reload is refused before it reaches the daemon."""
    (etc / "override.d").mkdir(exist_ok=True)
    (etc / "override.d" / "actions.yaml").write_text("actions:\n  mode: enforce\n  early_reject: maybe\n")
    status, out, err = run(capsys, "lint", "--etc-dir", str(etc))
    assert status != 0
    assert "actions.yaml:3" in out + err and "actions.early_reject" in out + err


def test_the_unit_refuses_a_reload_that_lint_refuses():
    unit = (Path(__file__).resolve().parents[1] / "debian" / "milterguard.service").read_text()
    reloads = [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("ExecReload=")]
    assert reloads == ["/usr/sbin/milterguard lint", "/bin/kill -HUP $MAINPID"]
