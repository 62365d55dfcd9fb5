"""Feedback from the quarantine: `release --learn-ham` and `delete --learn-spam` teach Bayes,
the classifier's samples and the hash store, against a real Postfix, milterguard and
redis-server on loopback.  Released mail goes straight to the sink."""

from __future__ import annotations

import json

import pytest

from milterguard.cli import main
from support.quarantine import held_message, message
from support.redis_fixtures import master  # noqa: F401  (fixture)

pytestmark = pytest.mark.postfix

SPAM_TEXT = ("MILTERGUARD-CANARY-REVIEW Dear winner, your parcel of premium watches is waiting at the depot; "
             "confirm your address and pay the small customs fee today to receive the watches before Friday.")


@pytest.fixture
def milterguard(milterguard_factory, master):  # noqa: F811  (the master fixture)
    # Autolearn takes every message as spam, so that a release as ham is a relearn.
    return milterguard_factory(sets={"redis.url": master.url, "bayes.autolearn": "true",
                                     "bayes.autolearn_spam": "-100"})


@pytest.fixture
def postfix(postfix_factory, milterguard):
    return postfix_factory(milterguard.socket)


def command(milterguard, sink, capsys, name: str, *args: str, redis_url: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main([name, *args, "--etc-dir", str(milterguard.etc_dir),
                   "--set", f"quarantine.url={milterguard.sets['quarantine.url']}",
                   "--set", f"quarantine.reinject=127.0.0.1:{sink.port}",
                   "--set", f"redis.url={redis_url}"])
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.fixture
def cli(milterguard, sink, capsys, master):  # noqa: F811
    """`milterguard quarantine ARGS...` with the filter's Redis: (status, stdout)."""
    def run(*args: str) -> tuple[int, str]:
        return command(milterguard, sink, capsys, "quarantine", *args, redis_url=master.url)[:2]

    return run


def bayes_stats(milterguard, sink, capsys, master) -> dict:  # noqa: F811
    status, out, _err = command(milterguard, sink, capsys, "bayes", "stats", "--json", redis_url=master.url)
    assert status == 0
    return json.loads(out)


def test_release_learn_ham_moves_what_autolearn_took_as_spam(postfix, milterguard, sink, cli, capsys, master):  # noqa: F811
    record, msgid = held_message(postfix, milterguard, cli)
    stats = bayes_stats(milterguard, sink, capsys, master)
    assert (stats["spam"], stats["ham"]) == (1, 0)  # autolearn took it as spam

    status, out = cli("release", record["id"], "--learn-ham", "--by", "postmaster")
    assert status == 0, out
    assert sink.wait_for_message_id(msgid).header("Subject") == "[SPAM] held for review"
    # The Subject tag is not learned: the digest is the scanned message's, so this is a relearn.
    assert f"{record['id']} learned as ham: 1 relearned; now 0 spam and 1 ham learned" in out
    stats = bayes_stats(milterguard, sink, capsys, master)
    assert (stats["spam"], stats["ham"], stats["samples"]) == (0, 1, 1)

    status, out = cli("learn", record["id"], "--learn-ham", "--json")
    assert status == 0 and json.loads(out)["learned"]["bayes"] == "known"
    stats = bayes_stats(milterguard, sink, capsys, master)
    assert (stats["spam"], stats["ham"]) == (0, 1)
    events = json.loads(cli("show", record["id"], "--json")[1])["events"]
    assert [(e["kind"], e["who"]) for e in events][:2] == [("release", "postmaster"), ("learn", "postmaster")]


def test_delete_learn_spam_learns_it_and_its_hashes_match(tmp_path, postfix, milterguard, sink, cli, capsys, master):  # noqa: F811
    raw, msgid = message(SPAM_TEXT, subject="your parcel")
    record, _msgid = held_message(postfix, milterguard, cli, raw_msgid=(raw, msgid))
    path = tmp_path / "spam.eml"
    path.write_bytes(raw)
    status, _out, _err = command(milterguard, sink, capsys, "fuzzy", "check", str(path), redis_url=master.url)
    assert status == 1  # not reported yet

    master.client().delete("mg:bayes:digests", "mg:bayes:totals")  # forget the autolearn: a new spam
    status, out = cli("delete", record["id"], "--learn-spam")
    assert status == 0, out
    assert f"{record['id']} learned as spam: 1 learned" in out and f"{record['id']} deleted" in out
    assert bayes_stats(milterguard, sink, capsys, master)["spam"] == 1
    status, out, _err = command(milterguard, sink, capsys, "fuzzy", "check", str(path), redis_url=master.url)
    assert status == 0 and "HASH_DENIED" in out
    assert cli("show", record["id"])[0] != 0


def test_release_goes_ahead_when_redis_is_down_and_learning_waits(postfix, milterguard, sink, cli, capsys, master):  # noqa: F811
    record, msgid = held_message(postfix, milterguard, cli)
    master.stop()
    capsys.readouterr()
    status, out, err = command(milterguard, sink, capsys, "quarantine", "release", record["id"], "--learn-ham",
                               redis_url=master.url)
    assert status == 75
    assert f"{record['id']} released to" in out
    assert "released but not learned as ham: Redis not reachable" in err
    assert f"milterguard quarantine learn {record['id']} --learn-ham" in err
    sink.wait_for_message_id(msgid)

    master.restart()
    status, out = cli("learn", record["id"], "--learn-ham")
    assert status == 0 and "1 learned" in out  # the restarted Redis has no data: a new ham


def test_delete_learn_spam_keeps_the_message_when_redis_is_down(postfix, milterguard, sink, cli, capsys, master):  # noqa: F811
    record, _msgid = held_message(postfix, milterguard, cli)
    master.stop()
    status, _out, err = command(milterguard, sink, capsys, "quarantine", "delete", record["id"], "--learn-spam",
                                redis_url=master.url)
    assert status == 75 and "not deleted" in err
    assert cli("show", record["id"])[0] == 0


def test_without_redis_learning_is_refused_and_nothing_is_released(postfix, milterguard, sink, capsys, master):  # noqa: F811
    cli = lambda *args: command(milterguard, sink, capsys, "quarantine", *args, redis_url="")  # noqa: E731
    record, msgid = held_message(postfix, milterguard, lambda *a: cli(*a)[:2])
    status, _out, err = cli("release", record["id"], "--learn-ham")
    assert status == 2
    assert "--learn-ham: Redis is not configured: set redis.url" in err and "nothing was done" in err
    assert cli("delete", record["id"], "--learn-spam")[0] == 2
    assert cli("release", record["id"], "--learn-spam")[0] == 2  # a release is never learned as spam
    assert not json.loads(cli("show", record["id"], "--json")[1])["released"]
    assert not any(m.message_id == msgid for m in sink.messages)
