"""Exact and SimHash content hashes against a real redis-server on loopback."""

from __future__ import annotations

import pytest

from milterguard.cli import main
from milterguard.config import load_config
from milterguard.engine.core import Engine
from milterguard.model import Action, Connection, Transaction
from milterguard.stores.hashes import digest, distance
from milterguard.mail.raw import split_message
from support import LOOPBACK, free_port
from support.redis import RedisServer, redis_available

SPAM = """Dear Friend,

I am Mr. Daniel Okoro, the chief accountant of the Federal Ministry of Mines. During our audit of
the 2019 accounts we found an unclaimed sum of 14,500,000 USD in a dormant account belonging to a
foreign contractor who died in a crash with his whole family. I need a trusted partner abroad to
receive the funds; you will keep 30 percent for your assistance and 10 percent goes to expenses.
Reply with your full name, phone number and bank details to start the transfer within 7 days.
This business is completely risk free and legal. Keep it confidential.

Yours faithfully,
Daniel Okoro
"""

MUTATED = (SPAM.replace("Dear Friend,", "Hello beloved one,")
           .replace("14,500,000", "27,250,000").replace("2019", "2021").replace("30 percent", "35 percent")
           .replace("7 days", "5 days").replace("Daniel Okoro", "Samuel Adebayo"))

UNRELATED = """Hi team,

the release candidate for version 4.2 is tagged. Please run the upgrade tests on your staging hosts
before Thursday and write down anything that looks off in the tracker. The database migration takes
about ten minutes on the large customers, so plan the window accordingly. Documentation for the new
export feature is in the wiki; Marta will present it in the Friday demo.

Thanks,
Jonas
"""


def mail(text: str) -> bytes:
    return ("From: someone@sender.example\nTo: bob@example.org\nSubject: hello\n"
            "Date: Mon, 02 Sep 2002 10:00:00 +0000\nMessage-ID: <x@sender.example>\n\n" + text).encode()


@pytest.fixture
def redis_url(tmp_path):
    if not redis_available():
        pytest.skip("redis-server is not installed")
    server = RedisServer.start(tmp_path / "redis")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def etc(tmp_path):
    path = tmp_path / "etc"
    path.mkdir()
    return path


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_bytes(mail(text))
    return str(path)


def fuzzy_cli(etc, url, *argv) -> int:
    return main(["fuzzy", *argv, "--etc-dir", str(etc), "--set", f"redis.url={url}"])


def evaluate(etc, url, text: str, *sets: str):
    engine = Engine.load(load_config(etc_dir=etc, sets=[f"redis.url={url}", *sets]), strict=True)
    headers, body = split_message(mail(text))
    txn = Transaction(mail_from="someone@sender.example", rcpts=["bob@example.org"], headers=headers, body=body)
    return engine.evaluate(Connection(client_ip="198.51.100.7"), txn)


def test_simhash_distances():
    assert distance(digest(SPAM).simhash, digest(MUTATED).simhash) <= 5
    assert distance(digest(SPAM).simhash, digest(UNRELATED).simhash) > 12
    # Numbers, case and white space do not change the exact hash.
    assert digest(SPAM).exact == digest(SPAM.replace("14,500,000", "99,000,001").upper().replace(" ", "  ")).exact


def test_simhash_is_each_bit_voted_by_the_shingles():
    import hashlib
    import random

    from milterguard.stores.hashes import simhash

    def by_the_definition(words):
        shingles = [" ".join(words[i:i + 3]) for i in range(len(words) - 2)] or words
        values = [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "big") for s in shingles]
        return sum(1 << bit for bit in range(64) if 2 * sum(v >> bit & 1 for v in values) > len(values))

    rng = random.Random(5)
    for n in (0, 1, 2, 3, 4, 9, 40, 301):
        words = [rng.choice(["win", "cash", "#", "now", "caf\u00e9", "x"]) for _ in range(n)]
        assert simhash(words) == by_the_definition(words)
    # Half a million characters (message.max_text_chars) give one digest like any text; how long
    # that takes is measured by the benchmarks (milterguard bench), not here.
    words = ["a", "b", "c"] * 87381
    assert digest(" ".join(words)).simhash == simhash(words)


def test_added_spam_and_its_mutation_are_caught_and_unrelated_mail_is_not(tmp_path, etc, redis_url, capsys):
    assert fuzzy_cli(etc, redis_url, "add", write(tmp_path, "spam.eml", SPAM)) == 0
    exact = evaluate(etc, redis_url, SPAM)
    assert "HASH_DENIED" in exact.symbols and exact.action == Action.REJECT
    near = evaluate(etc, redis_url, MUTATED)
    hit = near.hit("FUZZY_DENIED")
    assert hit is not None and hit.options[0].startswith("distance ")
    assert 0 < int(hit.options[0].split()[1]) <= 5 and "bits from reported" in hit.text
    assert not {"HASH_DENIED", "FUZZY_DENIED"} & set(evaluate(etc, redis_url, UNRELATED).symbols)
    capsys.readouterr()
    assert fuzzy_cli(etc, redis_url, "check", write(tmp_path, "mutated.eml", MUTATED)) == 0
    assert "FUZZY_DENIED\tdistance" in capsys.readouterr().out
    assert fuzzy_cli(etc, redis_url, "check", write(tmp_path, "other.eml", UNRELATED)) == 1


def test_deleted_entries_no_longer_match(tmp_path, etc, redis_url):
    path = write(tmp_path, "spam.eml", SPAM)
    fuzzy_cli(etc, redis_url, "add", path)
    assert fuzzy_cli(etc, redis_url, "del", path) == 0
    assert not {"HASH_DENIED", "FUZZY_DENIED"} & set(evaluate(etc, redis_url, MUTATED).symbols)
    assert fuzzy_cli(etc, redis_url, "del", path) == 1


def test_entries_expire(tmp_path, etc, redis_url):
    import redis as redislib

    fuzzy_cli(etc, redis_url, "add", write(tmp_path, "spam.eml", SPAM), "--set", "fuzzy.ttl=100")
    client = redislib.Redis.from_url(redis_url)
    ttls = [client.ttl(key) for key in client.scan_iter("mg:fuzzy:*")]
    assert len(ttls) == 9 and all(0 < t <= 100 for t in ttls)


def test_known_spam_is_decided_before_costly_checks(tmp_path, etc, redis_url):
    fuzzy_cli(etc, redis_url, "add", write(tmp_path, "spam.eml", SPAM))
    # clamd would answer "unavailable" here, were it asked at all.
    verdict = evaluate(etc, redis_url, SPAM, f"clamav.address={LOOPBACK}:{free_port()}")
    assert verdict.reason == "HASH_DENIED" and "CLAMAV_TEMPFAIL" not in verdict.symbols


def test_redis_down_fails_open(etc):
    verdict = evaluate(etc, f"redis://{LOOPBACK}:{free_port()}/0", SPAM)
    assert "FUZZY_TEMPFAIL" in verdict.symbols and verdict.action != Action.REJECT
