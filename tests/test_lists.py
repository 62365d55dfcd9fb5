"""Allow and block lists: four kinds of entry, global and per recipient domain, reload on change."""

from __future__ import annotations

import uuid
import pytest

from milterguard.cli import main
from milterguard.config import load_config
from milterguard.engine.core import Engine
from milterguard.model import Action, Connection, Stage, Transaction, DmarcResult, SpfResult
from milterguard.mail.raw import split_message
from support import wait_until


def mail(sender="Alice <alice@sender.example>", body="Hello Bob, the notes of the call are attached.") -> bytes:
    return (
        f"From: {sender}\nTo: bob@example.org\nSubject: notes\nDate: Mon, 02 Sep 2002 10:00:00 +0000\n"
        f"Message-ID: <{uuid.uuid4().hex}@sender.example>\n\n{body}\n"
    ).encode()


def message_id(raw: bytes) -> str:
    return next(line.split(b":", 1)[1].strip().decode() for line in raw.splitlines() if line.startswith(b"Message-ID:"))


@pytest.fixture
def etc(tmp_path):
    path = tmp_path / "etc"
    (path / "lists").mkdir(parents=True)
    return path


def cli(etc, *argv) -> int:
    return main(["list", *argv, "--etc-dir", str(etc)])


def run(etc, raw=None, ip="198.51.100.7", mail_from="alice@sender.example", rcpts=("bob@example.org",),
        facts=None, sets=()):
    config = load_config(etc_dir=etc, sets=["lists.check_interval=0", "checks.disabled=[dmarc]", *sets])
    engine = Engine.load(config, strict=True)
    headers, body = split_message(raw or mail())
    txn = Transaction(mail_from=mail_from, rcpts=list(rcpts), headers=headers, body=body, body_size=len(body))
    for name, value in (facts or {}).items():
        setattr(txn.facts, name, value)
    return engine.evaluate(Connection(client_ip=ip, client_name="mx.sender.example"), txn)


@pytest.mark.parametrize("entry, stage", [
    ("198.51.100.7", Stage.CONNECT),
    ("198.51.100.0/24", Stage.CONNECT),
    ("alice@sender.example", Stage.MAIL_FROM),
    ("sender.example", Stage.MAIL_FROM),
])
def test_global_block_of_each_kind_rejects_at_the_earliest_stage(etc, entry, stage):
    assert cli(etc, "add", "block", entry) == 0
    verdict = run(etc)
    assert verdict.action == Action.REJECT and verdict.reason == "LIST_BLOCK"
    assert verdict.stage == stage
    assert verdict.hit("LIST_BLOCK").options[0].endswith(f":{entry}")


def test_header_from_block_rejects_at_end_of_headers(etc):
    cli(etc, "add", "block", "evil.example")
    verdict = run(etc, mail("Boss <boss@evil.example>"), mail_from="bounce@bulk.example")
    assert verdict.stage == Stage.HEADERS and verdict.reason == "LIST_BLOCK"


def test_per_domain_block_applies_to_that_domain_only(etc):
    cli(etc, "add", "block", "198.51.100.0/24", "--domain", "example.org")
    verdict = run(etc, rcpts=("bob@example.org",))
    assert verdict.reason == "LIST_BLOCK" and verdict.stage == Stage.RCPT
    assert verdict.hit("LIST_BLOCK").where == "list of example.org"
    # Subdomains of the recipient domain share its lists; other domains do not.
    assert run(etc, rcpts=("carol@dept.example.org",)).reason == "LIST_BLOCK"
    assert "LIST_BLOCK" not in run(etc, rcpts=("dave@example.com",)).symbols


def test_per_domain_block_at_rcpt_refuses_that_recipient_alone(etc):
    cli(etc, "add", "block", "alice@sender.example", "--domain", "example.org")
    raw = mail()
    verdict = run(etc, raw, rcpts=("bob@example.org", "carol@example.com"))
    # bob's RCPT was refused; the message goes on to carol, scored without the block entry.
    assert verdict.action != Action.REJECT and "LIST_BLOCK" not in verdict.symbols
    assert [(v.rcpt, v.reason, v.stage) for v in verdict.refused] == [("bob@example.org", "LIST_BLOCK", Stage.RCPT)]
    assert verdict.refused[0].hit("LIST_BLOCK").options == ["email:alice@sender.example"]
    # Refused for every recipient: the message is refused.
    verdict = run(etc, raw, rcpts=("bob@example.org", "eve@dept.example.org"))
    assert verdict.action == Action.REJECT and verdict.rcpt == "eve@dept.example.org"
    assert [v.rcpt for v in verdict.refused] == ["bob@example.org"]


def test_global_block_still_refuses_every_recipient(etc):
    cli(etc, "add", "block", "alice@sender.example")
    verdict = run(etc, rcpts=("bob@example.org", "carol@example.com"))
    assert verdict.action == Action.REJECT and verdict.stage == Stage.MAIL_FROM and not verdict.rcpt


def test_per_domain_block_of_the_from_header_removes_that_domains_recipients(etc):
    cli(etc, "add", "block", "boss@evil.example", "--domain", "example.org")
    raw = mail("Boss <boss@evil.example>")
    config = load_config(etc_dir=etc, sets=["lists.check_interval=0", "checks.disabled=[dmarc]"])
    engine = Engine.load(config, strict=True)
    headers, body = split_message(raw)
    txn = Transaction(mail_from="bounce@bulk.example", rcpts=["bob@example.org", "carol@example.com"],
                      headers=headers, body=body, body_size=len(body))
    verdict = engine.evaluate(Connection(client_ip="198.51.100.7"), txn)
    assert verdict.action != Action.REJECT and verdict.hit("LIST_BLOCK_RCPT").options == ["bob@example.org"]
    assert list(verdict.drop_rcpts) == ["bob@example.org"] and "boss@evil.example" in verdict.drop_rcpts["bob@example.org"]
    # Every recipient's domain blocks it: the message is refused at end of headers.
    verdict = run(etc, raw, mail_from="bounce@bulk.example", rcpts=("bob@example.org", "eve@dept.example.org"))
    assert verdict.reason == "LIST_BLOCK" and verdict.stage == Stage.HEADERS


def test_allow_entries_match_the_envelope_sender_unless_it_fails_spf(etc):
    cli(etc, "add", "allow", "bounces.partner.example")
    sets = ["checks.disabled=[dmarc,spf]"]
    verdict = run(etc, mail_from="list@bounces.partner.example", sets=sets)
    assert verdict.hit("LIST_ALLOW").text == "sender list@bounces.partner.example matches bounces.partner.example"
    # The SPF check is disabled here: its fact is put in place.
    failing = {"spf": SpfResult(result="fail", domain="bounces.partner.example", identity="mailfrom",
                                sender="list@bounces.partner.example", ip="198.51.100.7")}
    verdict = run(etc, mail_from="list@bounces.partner.example", facts=failing, sets=sets)
    assert "LIST_ALLOW" not in verdict.symbols and verdict.hit("LIST_ALLOW_IGNORED")
    assert "LIST_ALLOW" not in run(etc, mail_from="other@elsewhere.example", sets=sets).symbols


@pytest.mark.parametrize("entry, kind", [
    ("198.51.100.7", "ip"), ("198.51.100.0/24", "cidr"), ("alice@sender.example", "email"), ("sender.example", "domain")])
def test_allow_of_each_kind_lowers_the_score(etc, entry, kind):
    before = run(etc).score
    cli(etc, "add", "allow", entry)
    verdict = run(etc)
    assert verdict.hit("LIST_ALLOW").options == [f"{kind}:{entry}"]
    assert verdict.score < before


def test_per_domain_allow(etc):
    cli(etc, "add", "allow", "sender.example", "--domain", "example.org")
    assert "LIST_ALLOW" in run(etc, rcpts=("bob@example.org",)).symbols
    assert "LIST_ALLOW" not in run(etc, rcpts=("dave@example.com",)).symbols


def test_allow_never_lifts_a_fixed_action(etc):
    cli(etc, "add", "allow", "sender.example", "198.51.100.7")
    verdict = run(etc, mail(body="MILTERGUARD-CANARY-REJECT"))
    assert "LIST_ALLOW" in verdict.symbols and verdict.action == Action.REJECT


def test_from_domain_allow_does_not_apply_when_dmarc_fails(etc):
    cli(etc, "add", "allow", "sender.example")
    # The DMARC check is disabled in run(): its fact is put in place here.
    failing = {"dmarc": DmarcResult(result="fail", domain="sender.example", policy="reject")}
    verdict = run(etc, facts=failing)
    assert "LIST_ALLOW" not in verdict.symbols
    assert verdict.hit("LIST_ALLOW_IGNORED").options == ["domain:sender.example"]
    passing = {"dmarc": DmarcResult(result="pass", domain="sender.example", policy="reject")}
    assert "LIST_ALLOW" in run(etc, facts=passing).symbols


def test_block_beats_allow(etc):
    cli(etc, "add", "allow", "198.51.100.7")
    cli(etc, "add", "block", "alice@sender.example")
    assert run(etc).reason == "LIST_BLOCK"


def test_list_files_reload_on_change_and_broken_ones_keep_their_entries(etc):
    config = load_config(etc_dir=etc, sets=["lists.check_interval=0", "checks.disabled=[dmarc]"])
    engine = Engine.load(config, strict=True)

    def verdict():
        headers, body = split_message(mail())
        txn = Transaction(mail_from="alice@sender.example", rcpts=["bob@example.org"], headers=headers, body=body)
        return engine.evaluate(Connection(client_ip="198.51.100.7"), txn)

    assert verdict().action != Action.REJECT
    cli(etc, "add", "block", "198.51.100.7")
    assert verdict().reason == "LIST_BLOCK"
    (etc / "lists" / "block.map").write_text("198.51.100.7\nnot an entry\n")
    assert verdict().reason == "LIST_BLOCK"
    cli(etc, "del", "block", "198.51.100.7")  # what is left ("not an entry") still does not parse
    (etc / "lists" / "block.map").write_text("# emptied\n")
    assert verdict().action != Action.REJECT


def test_cli_show_add_del(etc, capsys):
    assert cli(etc, "add", "block", "192.0.2.1", "spam@example.net", "--domain", "Example.ORG") == 0
    assert cli(etc, "add", "block", "192.0.2.1", "--domain", "example.org") == 0  # already there: nothing added
    assert (etc / "lists" / "example.org" / "block.map").read_text() == "192.0.2.1\nspam@example.net\n"
    capsys.readouterr()
    assert cli(etc, "show") == 0
    assert "192.0.2.1" in capsys.readouterr().out
    assert cli(etc, "del", "block", "192.0.2.1", "--domain", "example.org") == 0
    assert cli(etc, "del", "block", "192.0.2.1", "--domain", "example.org") == 1
    assert cli(etc, "add", "block", "two words") == 2
    assert cli(etc, "add", "block") == 2


@pytest.mark.postfix
def test_block_added_while_running_refuses_through_postfix(postfix_factory, milterguard_factory, sink):
    mg = milterguard_factory(workers=1)
    pf = postfix_factory(mg)
    raw = mail(body="first MILTERGUARD-CANARY-CLEAN")
    assert pf.send(raw, xclient={"ADDR": "203.0.113.9", "NAME": "mx.sender.example"}).code == 250
    assert main(["list", "add", "block", "203.0.113.0/24", "--etc-dir", str(mg.etc_dir)]) == 0

    def refused():
        result = pf.send(mail(body="again"), xclient={"ADDR": "203.0.113.9", "NAME": "mx.sender.example"})
        return result if result.code == 550 else None

    result = wait_until(refused, 10, interval=0.5, what="the new block entry to take effect", on_timeout=mg.log_tail)
    assert result.stage == "rcpt"


@pytest.mark.postfix
def test_message_to_two_domains_reaches_only_the_one_that_does_not_block_the_sender(postfix_factory, milterguard_factory,
                                                                                    sink):
    mg = milterguard_factory(workers=1, sets={"lists.check_interval": 0})
    pf = postfix_factory(mg)
    assert main(["list", "add", "block", "alice@sender.example", "--domain", "example.org",
                 "--etc-dir", str(mg.etc_dir)]) == 0
    client = {"ADDR": "203.0.113.9", "NAME": "mx.sender.example"}

    # The envelope sender: example.org's RCPT is refused, example.com's accepted.
    raw = mail(body="the notes MILTERGUARD-CANARY-CLEAN")
    result = pf.send(raw, "alice@sender.example", ["bob@example.org", "carol@example.com"], xclient=client)
    assert result.code == 250, result
    assert result.rcpt_codes["bob@example.org"][0] == 550 and result.rcpt_codes["carol@example.com"][0] == 250
    got = sink.wait_for_message_id(message_id(raw))
    assert got.rcpt_tos == ["carol@example.com"]

    # Only the From header: both RCPTs accepted, example.org's recipient removed at end of message.
    raw = mail("Alice <alice@sender.example>", body="again MILTERGUARD-CANARY-CLEAN")
    result = pf.send(raw, "bounce@bulk.example", ["bob@example.org", "carol@example.com"], xclient=client)
    assert result.code == 250 and all(code == 250 for code, _ in result.rcpt_codes.values()), result
    got = sink.wait_for_message_id(message_id(raw))
    assert got.rcpt_tos == ["carol@example.com"]
    assert "recipient bob@example.org removed" in mg.log_tail()
