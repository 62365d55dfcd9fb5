"""Allow and block lists in Redis (lists.backend: redis), against a real redis-server:
editing and importing, the version counter, the copy kept while Redis is away."""

from __future__ import annotations

import logging

import pytest

from milterguard.cli import main
from milterguard.clients.redis_client import RedisUnavailable, get_store
from milterguard.config import ConfigError, load_config
from milterguard.engine.core import Engine
from milterguard.mail.raw import split_message
from milterguard.model import Action, Connection, Stage, Transaction
from milterguard.stores.lists import redis_add, store_for
from support import wait_until
from support.redis import redis_available
from support.redis_fixtures import master, replica  # noqa: F401  (fixtures)
from test_lists import mail

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")


@pytest.fixture
def etc(tmp_path, master):
    """An etc directory whose lists live in the `master` fixture's Redis."""
    path = tmp_path / "etc"
    (path / "lists").mkdir(parents=True)
    (path / "local.d").mkdir()
    (path / "local.d" / "redis.yaml").write_text(
        f"redis: {{url: '{master.url}', prefix: 'site-a:'}}\nlists: {{backend: redis, check_interval: 0}}\n")
    return path


def cli(etc, *argv) -> int:
    return main(["list", *argv, "--etc-dir", str(etc)])


def config_of(etc, *sets):
    return load_config(etc_dir=etc, sets=["checks.disabled=[dmarc]", *sets])


def verdict(engine, mail_from="alice@sender.example", ip="198.51.100.7", rcpts=("bob@example.org",)):
    headers, body = split_message(mail())
    txn = Transaction(mail_from=mail_from, rcpts=list(rcpts), headers=headers, body=body, body_size=len(body))
    return engine.evaluate(Connection(client_ip=ip, client_name="mx.sender.example"), txn)


def test_list_add_del_show_edit_the_sets_in_redis(etc, master, capsys):
    assert cli(etc, "add", "block", "198.51.100.0/24", "Spam@Example.NET") == 0
    assert cli(etc, "add", "allow", "partner.example", "--domain", "Example.ORG") == 0
    assert "already" not in capsys.readouterr().out
    assert cli(etc, "add", "block", "spam@example.net") == 0  # there already: nothing added
    assert capsys.readouterr().out == ""
    redis = master.client()
    assert redis.smembers("site-a:lists:block") == {b"198.51.100.0/24", b"spam@example.net"}
    assert redis.smembers("site-a:lists:d:example.org:allow") == {b"partner.example"}
    assert redis.smembers("site-a:lists:domains") == {b"example.org"}
    version = redis.get("site-a:lists:version")
    assert cli(etc, "add", "block", "192.0.2.1") == 0
    assert redis.get("site-a:lists:version") != version  # every change sets a new one
    assert not (etc / "lists" / "block.map").exists()  # the files are not touched

    capsys.readouterr()
    assert cli(etc, "show") == 0
    out = capsys.readouterr().out
    assert "# block (global): site-a:lists:block\n192.0.2.1\n198.51.100.0/24\nspam@example.net\n" in out
    assert "# allow example.org: site-a:lists:d:example.org:allow\npartner.example\n" in out
    assert cli(etc, "del", "block", "198.51.100.0/24") == 0
    assert cli(etc, "del", "block", "198.51.100.0/24") == 1
    assert redis.smembers("site-a:lists:block") == {b"192.0.2.1", b"spam@example.net"}
    assert cli(etc, "add", "block", "two words") == 2


def test_import_copies_the_files_into_redis(etc, master, capsys):
    (etc / "lists" / "block.map").write_text("# spam sources\n203.0.113.0/24\nbad.example\n")
    (etc / "lists" / "example.org").mkdir()
    (etc / "lists" / "example.org" / "allow.map").write_text("friend@partner.example\n")
    (etc / "lists" / "example.com").mkdir()
    (etc / "lists" / "example.com" / "block.map").write_text("other.example\n")
    assert cli(etc, "import", "--domain", "example.org") == 0
    redis = master.client()
    assert redis.smembers("site-a:lists:d:example.org:allow") == {b"friend@partner.example"}
    assert not redis.exists("site-a:lists:block", "site-a:lists:d:example.com:block")
    capsys.readouterr()
    assert cli(etc, "import") == 0
    out = capsys.readouterr().out
    assert f"{etc}/lists/block.map: 2 entries added to site-a:lists:block" in out
    assert "example.org/allow.map: 0 entries added" in out  # imported before
    assert redis.smembers("site-a:lists:block") == {b"203.0.113.0/24", b"bad.example"}
    assert redis.smembers("site-a:lists:domains") == {b"example.org", b"example.com"}
    # A file that does not parse is not copied.
    (etc / "lists" / "allow.map").write_text("not an entry\n")
    assert cli(etc, "import", "allow", "--domain", "") == 2
    assert not redis.exists("site-a:lists:allow")


def test_the_filter_judges_by_the_lists_in_redis(etc):
    engine = Engine.load(config_of(etc), strict=True)
    assert verdict(engine).action != Action.REJECT
    assert cli(etc, "add", "block", "alice@sender.example", "--domain", "example.org") == 0
    refused = verdict(engine)
    assert refused.reason == "LIST_BLOCK" and refused.stage == Stage.RCPT
    assert refused.hit("LIST_BLOCK").where == "list of example.org"
    assert "LIST_BLOCK" not in verdict(engine, rcpts=("dave@example.com",)).symbols
    assert cli(etc, "add", "allow", "198.51.100.7") == 0
    assert "LIST_ALLOW" in verdict(engine, rcpts=("dave@example.com",)).symbols
    assert cli(etc, "del", "block", "alice@sender.example", "--domain", "example.org") == 0
    assert verdict(engine).action != Action.REJECT


def test_reads_go_to_the_replica(etc, master, replica):
    config = config_of(etc, f"redis.replicas=['{replica.url}']")
    assert cli(etc, "add", "block", "alice@sender.example") == 0
    master.wait_replicated(replica)
    lists = store_for(config)
    assert lists.store.reader().name == replica.url
    assert lists.lookup("block", "", "alice@sender.example") == "alice@sender.example"
    # A node that knows only the replica reads the lists and cannot edit them.
    (etc / "local.d" / "redis.yaml").write_text(
        f"redis: {{replicas: ['{replica.url}'], prefix: 'site-a:'}}\nlists: {{backend: redis, check_interval: 0}}\n")
    assert cli(etc, "add", "block", "bob@sender.example") == 2
    assert store_for(config_of(etc)).lookup("block", "", "alice@sender.example") == "alice@sender.example"


def test_the_version_is_asked_at_most_every_check_interval(etc, master):
    lists = store_for(config_of(etc, "lists.check_interval=3600"))
    store = lists.store
    redis_add(store, "block", "", ["192.0.2.1"])
    assert lists.lookup("block", "", "192.0.2.1", is_ip=True) == "192.0.2.1"  # the first look reads them
    master.client().config_resetstat()
    redis_add(store, "block", "", ["192.0.2.2"])
    for _ in range(200):
        assert lists.lookup("block", "", "192.0.2.2", is_ip=True) is None  # the copy, unasked
    stats = master.client().info("commandstats")
    assert "cmdstat_get" not in stats and "cmdstat_smembers" not in stats
    lists.check_interval = 0
    assert lists.lookup("block", "", "192.0.2.2", is_ip=True) == "192.0.2.2"
    # An unchanged version costs one GET, and the sets are not read again.
    master.client().config_resetstat()
    for _ in range(5):
        lists.lookup("block", "", "192.0.2.2", is_ip=True)
    stats = master.client().info("commandstats")
    assert stats["cmdstat_get"]["calls"] == 5 and "cmdstat_smembers" not in stats


def test_redis_away_keeps_the_last_copy_and_says_so_once(etc, master, caplog):
    lists = store_for(config_of(etc))
    redis_add(lists.store, "block", "", ["192.0.2.1", "spam@example.net"])
    assert lists.lookup("block", "", "192.0.2.1", is_ip=True) == "192.0.2.1"
    master.stop()
    with caplog.at_level(logging.INFO):
        for _ in range(50):
            assert lists.lookup("block", "", "192.0.2.1", is_ip=True) == "192.0.2.1"
            assert lists.lookup("block", "", "spam@example.net") == "spam@example.net"
        # One account of Redis for all that uses it: one line, which says what the lists do.
        lines = [r.getMessage() for r in caplog.records if r.name in ("milterguard.lists", "milterguard.redis")]
        assert len(lines) == 1, lines
        assert "unavailable" in lines[0] and "lists and maps in Redis keep their last copy" in lines[0]
        # Back (empty: this test's Redis keeps nothing on disk): the copy follows it, one line says so.
        master.restart()

        def added() -> bool:  # the client waits out its back-off before it asks again
            try:
                return bool(redis_add(lists.store, "block", "", ["192.0.2.9"]))
            except RedisUnavailable:
                return False

        wait_until(added, 10, interval=0.1, what="Redis back")
        wait_until(lambda: lists.lookup("block", "", "192.0.2.9", is_ip=True), 10, interval=0.1,
                   what="the lists read again")
    lines = [r.getMessage() for r in caplog.records if r.name in ("milterguard.lists", "milterguard.redis")]
    assert len(lines) == 2 and "back after" in lines[1], lines
    assert lists.lookup("block", "", "192.0.2.1", is_ip=True) is None


def test_redis_backend_needs_a_redis(tmp_path):
    with pytest.raises(ConfigError, match="lists.backend is redis, but no Redis is configured"):
        load_config(etc_dir=tmp_path, sets=["lists.backend=redis"])


def test_lists_of_two_prefixes_are_apart(etc, master):
    assert cli(etc, "add", "block", "192.0.2.1") == 0
    other = store_for(config_of(etc, "redis.prefix=site-b:"))
    assert other.lookup("block", "", "192.0.2.1", is_ip=True) is None
    assert get_store(config_of(etc)).key("lists", "block") == "site-a:lists:block"
