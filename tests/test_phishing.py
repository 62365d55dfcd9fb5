"""Phishing lookalikes: the bounded edit distance, the prepared protected domains, and
what one message costs (the case files in tests/cases/phishing/ cover the symbols)."""

from __future__ import annotations

import itertools

import pytest

from milterguard.checks import phishing
from milterguard.checks.phishing import Guarded, edit_distance, lookalike
from milterguard.config import load_config
from milterguard.engine.core import Engine
from milterguard.model import Connection, Transaction
from milterguard.mail.raw import split_message


def full_distance(a: str, b: str) -> int:
    """Optimal string alignment distance over the whole matrix, without any bound."""
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        d[i][0] = i
    for j in range(len(b) + 1):
        d[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def words(alphabet: str, longest: int):
    for n in range(longest + 1):
        for letters in itertools.product(alphabet, repeat=n):
            yield "".join(letters)


def test_bounded_distance_agrees_with_the_whole_matrix():
    pool = list(words("ab.", 5))
    for a, b in itertools.product(pool, repeat=2):
        want = full_distance(a, b)
        for limit in (0, 1, 2, 3):
            assert edit_distance(a, b, limit) == min(want, limit + 1), (a, b, limit)


@pytest.mark.parametrize("a, b, distance", [
    ("paypal.com", "paypa1.com", 1), ("paypal.com", "paypla.com", 1), ("paypal.com", "paypall.com", 1),
    ("paypal.com", "aypal.com", 1), ("microsoft.com", "micorsfot.com", 2), ("paypal.com", "paypal.com", 0),
    ("apple.com", "google.com", 4),
])
def test_distance_examples(a, b, distance):
    assert edit_distance(a, b, 3) == min(distance, 4)
    assert edit_distance(a, b, 1) == min(distance, 2)


PROTECTED = frozenset({"paypal.com", "microsoft.com", "amazon.com", "amazon.de", "acme-mail.example", "dhl.com"})


@pytest.mark.parametrize("host, imitated", [
    ("paypa1.com", "paypal.com"),
    ("rnicrosoft.com", "microsoft.com"),
    ("login.micros0ft.com", "microsoft.com"),
    ("arnazon.com", "amazon.com"),
    ("paypal.com.evil.example", "paypal.com"),
    ("secure-paypal.example", "paypal.com"),
    ("paypal-secure.example", "paypal.com"),
    ("my-paypal-login.example", "paypal.com"),
    ("acme-mail-secure.example", "acme-mail.example"),
    ("paypal.com", None),
    ("www.paypal.com", None),  # the domain itself, or under it
    ("amazon.de", None),
    ("paypalmail.example", None),  # the name inside a longer word
    ("dh1.com", None),  # names under five letters are not compared
    ("example.net", None),
])
def test_lookalikes(host, imitated):
    assert lookalike(host, (Guarded(PROTECTED, 1),)) == imitated


def test_recipient_domain_guard_and_its_subdomains():
    guards = (Guarded(PROTECTED, 1), Guarded(frozenset({"example.org"}), 1))
    assert lookalike("examp1e.org", guards) == "example.org"
    assert lookalike("mail.example.org", guards) is None


def test_distance_only_to_protected_domains_of_about_the_same_length(monkeypatch):
    compared = []
    real = phishing.edit_distance

    def counting(a, b, limit):
        compared.append(b)
        return real(a, b, limit)

    monkeypatch.setattr(phishing, "edit_distance", counting)
    domains = frozenset(f"{name}.example" for name in ("abcdefg", "brandname", "longerbrandname", "shorter"))
    assert lookalike("brandnamf.example", (Guarded(domains, 1),)) == "brandname.example"
    assert compared == ["brandname.example"]  # neither abcdefg.example nor the longer or shorter ones


def message(links: list[str], sender: str = "Notice <notice@paypa1.com>") -> bytes:
    body = "\n".join(f"https://{host}/x" for host in links)
    return (f"From: {sender}\nTo: user@example.org\nSubject: notice\nDate: Mon, 02 Sep 2002 10:00:00 +0000\n"
            f"Message-ID: <n@example.net>\n\n{body}\n").encode()


def test_protected_domains_are_prepared_when_the_engine_loads(tmp_path, monkeypatch):
    config = load_config(etc_dir=tmp_path, sets=["phishing.protected_domains=[partner.example]"])
    Engine.load(config, strict=True)
    prepared = phishing._PREPARED[id(config)]
    assert "partner.example" in prepared.protected and "paypal.com" in prepared.protected
    built = []
    monkeypatch.setattr(phishing, "Guarded", lambda *a: built.append(a) or Guarded(*a))
    engine = Engine.load(config, strict=True)
    headers, body = split_message(message(["partner-secure.example", "paypa1.com"] * 3))
    for _ in range(3):
        txn = Transaction(mail_from="notice@paypa1.com", rcpts=["user@prepared-test.example"], headers=headers,
                          body=body, body_size=len(body))
        verdict = engine.evaluate(Connection(client_ip="198.51.100.7"), txn)
        assert set(verdict.hit("PHISH_LOOKALIKE_URL").options) == {"partner-secure.example~partner.example",
                                                                   "paypa1.com~paypal.com"}
        assert verdict.hit("PHISH_LOOKALIKE_FROM").options == ["paypa1.com~paypal.com"]
    # The configured set was built at load; the recipient's domain once, not per message.
    assert built == [(frozenset({"prepared-test.example"}), 1)]


def test_each_distinct_domain_is_judged_once_per_message(tmp_path, monkeypatch):
    engine = Engine.load(load_config(etc_dir=tmp_path), strict=True)
    judged = []
    real = phishing.lookalike
    monkeypatch.setattr(phishing, "lookalike", lambda domain, guards: judged.append(domain) or real(domain, guards))
    headers, body = split_message(message(["paypa1.com", "example.net", "paypa1.com", "www.example.net"] * 5))
    txn = Transaction(mail_from="notice@paypa1.com", rcpts=["user@example.org"], headers=headers, body=body,
                      body_size=len(body))
    verdict = engine.evaluate(Connection(client_ip="198.51.100.7"), txn)
    assert "PHISH_LOOKALIKE_URL" in verdict.symbols
    assert sorted(judged) == ["example.net", "paypa1.com", "www.example.net"]
