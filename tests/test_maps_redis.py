"""Maps of rules in Redis (`map: redis:NAME`), against a real redis-server: the `map` command,
a running engine that follows its changes, the copy kept while Redis is away, and lint."""

from __future__ import annotations

import logging
import time

import pytest

from milterguard.cli import main
from milterguard.config import load_config
from milterguard.engine.core import Engine
from milterguard.mail.raw import split_message
from milterguard.model import Action, Connection, Transaction
from support import wait_until
from support.redis import redis_available
from support.redis_fixtures import master  # noqa: F401  (fixture)
from test_lists import mail

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")

RULES = """\
- symbol: LOCAL_BLOCKED_CLIENT
  description: The client is in the blocked_clients map in Redis
  weight: 0
  action: reject
  match: {map: 'redis:blocked_clients', key: client_ip}
- symbol: LOCAL_BULK_SENDER
  description: The envelope sender is in the bulk_senders map in Redis
  weight: 1
  match: {map: 'redis:bulk_senders', key: mail_from}
"""


@pytest.fixture
def etc(tmp_path, master):
    """An etc directory whose rules name maps in the `master` fixture's Redis."""
    path = tmp_path / "etc"
    for sub in ("rules.d", "local.d", "maps"):
        (path / sub).mkdir(parents=True)
    (path / "rules.d" / "local.yaml").write_text(RULES)
    (path / "local.d" / "redis.yaml").write_text(
        f"redis: {{url: '{master.url}', prefix: 'site-a:'}}\nlists: {{check_interval: 0.2}}\n")
    return path


def cli(etc, *argv) -> int:
    return main(["map", *argv, "--etc-dir", str(etc)])


def engine_of(etc) -> Engine:
    return Engine.load(load_config(etc_dir=etc, sets=["checks.disabled=[dmarc]"]), strict=True)


def verdict(engine, ip="198.51.100.7", mail_from="alice@sender.example"):
    headers, body = split_message(mail())
    txn = Transaction(mail_from=mail_from, rcpts=["bob@example.org"], headers=headers, body=body,
                      body_size=len(body))
    return engine.evaluate(Connection(client_ip=ip, client_name="mx.sender.example"), txn)


def test_map_add_del_show_edit_the_set_in_redis(etc, master, capsys):
    assert cli(etc, "add", "blocked_clients", "198.51.100.0/24", "192.0.2.1") == 0
    assert cli(etc, "add", "redis:bulk_senders", "News@Bulk.Example") == 0
    redis = master.client()
    assert redis.smembers("site-a:maps:m:blocked_clients") == {b"198.51.100.0/24", b"192.0.2.1"}
    assert redis.smembers("site-a:maps:m:bulk_senders") == {b"news@bulk.example"}
    version = redis.hget("site-a:maps:versions", "blocked_clients")
    assert cli(etc, "del", "blocked_clients", "192.0.2.1") == 0
    assert redis.hget("site-a:maps:versions", "blocked_clients") != version  # every change sets a new one
    assert cli(etc, "del", "blocked_clients", "192.0.2.1") == 1  # not there
    capsys.readouterr()
    assert cli(etc, "show") == 0
    assert capsys.readouterr().out == ("# redis:blocked_clients: site-a:maps:m:blocked_clients, 1 entries\n"
                                       "# redis:bulk_senders: site-a:maps:m:bulk_senders, 1 entries\n")
    assert cli(etc, "show", "blocked_clients") == 0
    assert capsys.readouterr().out.endswith("1 entries\n198.51.100.0/24\n")
    assert cli(etc, "add", "blocked_clients", "two words") == 2
    assert cli(etc, "add", "bad:name", "192.0.2.1") == 2
    assert cli(etc, "add", "blocked_clients") == 2


def test_import_copies_a_map_file(etc, master, capsys):
    (etc / "maps" / "bulk.map").write_text("# bulk senders\n@bulk.example\nnews@other.example\n")
    assert cli(etc, "import", "bulk_senders", "bulk.map") == 0  # found in rules.maps_dirs
    assert f"{etc}/maps/bulk.map: 2 entries added to site-a:maps:m:bulk_senders" in capsys.readouterr().out
    assert master.client().smembers("site-a:maps:m:bulk_senders") == {b"@bulk.example", b"news@other.example"}
    # A file that does not parse is not copied.
    (etc / "maps" / "bad.map").write_text("192.0.2.1\nnot an entry\n")
    assert cli(etc, "import", "blocked_clients", str(etc / "maps" / "bad.map")) == 2
    assert not master.client().exists("site-a:maps:m:blocked_clients")
    assert cli(etc, "import", "blocked_clients", "missing.map") == 2


def test_a_running_engine_follows_the_map_within_the_interval(etc):
    engine = engine_of(etc)
    assert verdict(engine).action != Action.REJECT
    assert cli(etc, "add", "blocked_clients", "198.51.100.0/24") == 0
    added = time.monotonic()
    wait_until(lambda: verdict(engine).action == Action.REJECT, 5, interval=0.05, what="the map read again")
    assert time.monotonic() - added < 2  # check_interval is 0.2s
    refused = verdict(engine)
    assert refused.reason == "LOCAL_BLOCKED_CLIENT"
    assert refused.hit("LOCAL_BLOCKED_CLIENT").where == "map redis:blocked_clients by client_ip"
    assert "LOCAL_BLOCKED_CLIENT" not in verdict(engine, ip="203.0.113.9").symbols
    assert cli(etc, "add", "bulk_senders", "bulk.example") == 0
    wait_until(lambda: "LOCAL_BULK_SENDER" in verdict(engine, ip="203.0.113.9", mail_from="x@news.bulk.example").symbols,
               5, interval=0.05, what="the second map read")
    assert cli(etc, "del", "blocked_clients", "198.51.100.0/24") == 0
    wait_until(lambda: verdict(engine).action != Action.REJECT, 5, interval=0.05, what="the entry gone")


def test_an_engine_started_later_reads_the_maps_at_once(etc):
    assert cli(etc, "add", "blocked_clients", "198.51.100.7") == 0
    assert verdict(engine_of(etc)).reason == "LOCAL_BLOCKED_CLIENT"


def test_redis_away_keeps_the_copy_without_a_line_of_its_own(etc, master, caplog):
    assert cli(etc, "add", "blocked_clients", "198.51.100.7") == 0
    engine = engine_of(etc)
    assert verdict(engine).reason == "LOCAL_BLOCKED_CLIENT"
    master.stop()
    with caplog.at_level(logging.INFO):
        deadline = time.monotonic() + 1.0  # several check intervals
        while time.monotonic() < deadline:
            assert verdict(engine).reason == "LOCAL_BLOCKED_CLIENT"
    lines = [r.getMessage() for r in caplog.records if r.name in ("milterguard.maps", "milterguard.redis")]
    assert len(lines) == 1 and "maps in Redis keep their last copy" in lines[0], lines


def test_lint_accepts_a_redis_map_and_refuses_it_without_redis(etc, capsys):
    assert main(["lint", "--etc-dir", str(etc)]) == 0
    (etc / "local.d" / "redis.yaml").unlink()
    capsys.readouterr()
    assert main(["lint", "--etc-dir", str(etc)]) == 1
    out = capsys.readouterr().out
    assert (f"error: {etc / 'rules.d' / 'local.yaml'}:5: LOCAL_BLOCKED_CLIENT: map redis:blocked_clients is in Redis, "
            "but no Redis is configured") in out
    (etc / "rules.d" / "local.yaml").write_text(RULES.replace("redis:bulk_senders", "redis:bad/name"))
    capsys.readouterr()
    assert main(["lint", "--etc-dir", str(etc)]) == 1
    assert "a map in Redis is named redis:NAME" in capsys.readouterr().out
