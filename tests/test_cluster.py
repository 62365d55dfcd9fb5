"""Several filter nodes sharing one Redis (docs/cluster.md): two `milterguard serve`
behind two Postfix instances, the lists in Redis, each node named in its verdicts."""

from __future__ import annotations

import time

import pytest

from milterguard.cli import main
from support import wait_until
from support.redis import RedisServer, redis_available
from test_lists import mail, message_id as raw_id

pytestmark = [pytest.mark.postfix,
              pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")]

CLIENT = {"ADDR": "203.0.113.9", "NAME": "mx.sender.example"}


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer.start(tmp_path / "redis")
    yield server
    server.stop()


def node(milterguard_factory, postfix_factory, redis_server, name: str, workers: int):
    """One filter node as docs/cluster.md sets it up: lists in the shared Redis, named NAME."""
    # In the node's etc, so that `milterguard list --etc-dir` reads it as the filter does.
    mg = milterguard_factory(name=name, workers=workers, config_text=(
        f"node: {{name: {name}}}\n"
        f"redis: {{url: '{redis_server.url}', retry_max: 1}}\n"
        "lists: {backend: redis}\n"))
    return mg, postfix_factory(mg, name=f"postfix-{name}")


def test_a_block_added_on_one_node_refuses_at_the_other_and_outlives_redis(
        redis_server, milterguard_factory, postfix_factory, sink):
    mg_a, pf_a = node(milterguard_factory, postfix_factory, redis_server, "mx-a", workers=1)
    mg_b, pf_b = node(milterguard_factory, postfix_factory, redis_server, "mx-b", workers=2)
    raw = mail(body="first MILTERGUARD-CANARY-CLEAN")
    assert pf_b.send(raw, "alice@sender.example", ["bob@example.org"], xclient=CLIENT).code == 250
    assert mg_b.verdict_for(raw_id(raw))["node"] == "mx-b"

    assert main(["list", "add", "block", "alice@sender.example", "--etc-dir", str(mg_a.etc_dir)]) == 0
    added = time.monotonic()

    def refused_at_b():
        result = pf_b.send(mail(body="again"), "alice@sender.example", ["bob@example.org"], xclient=CLIENT)
        return result if result.code == 550 else None

    result = wait_until(refused_at_b, 5, interval=0.2, what="node B to refuse the sender blocked through node A",
                        on_timeout=mg_b.log_tail)
    assert time.monotonic() - added < 5
    refused = [v for v in mg_b.verdicts() if v.reason == "LIST_BLOCK"]
    assert refused and refused[-1]["node"] == "mx-b"

    # Each worker has its own copy: wait until both have refused (read the new version).
    def pid(line: str) -> str:
        return line.split("milterguard[", 1)[1].split("]", 1)[0]

    wait_until(lambda: refused_at_b() and len({pid(v.line) for v in mg_b.verdicts() if v.reason == "LIST_BLOCK"}) == 2,
               10, interval=0.1, what="both workers of node B to refuse", on_timeout=mg_b.log_tail)

    # Redis goes away: node B judges by its last copy, and other mail flows.
    redis_server.stop()
    # Mail for 3 seconds, so that each worker has looked for a new version (every second) meanwhile.
    stopped, attempt = time.monotonic(), 0
    while time.monotonic() - stopped < 3:
        attempt += 1
        assert refused_at_b() is not None, f"attempt {attempt}: the blocked sender got through"
        other = mail("Carol <carol@partner.example>", body=f"still flowing {attempt} MILTERGUARD-CANARY-CLEAN")
        result = pf_b.send(other, "carol@partner.example", ["bob@example.org"], xclient=CLIENT)
        assert result.code == 250, result
        assert mg_b.verdict_for(raw_id(other))["node"] == "mx-b"
    # One line per worker that noticed: the outage of Redis, for everything that uses it.
    lines = [line for line in mg_b.log_text().splitlines() if "Redis" in line and "unavailable" in line]
    workers = {pid(line) for line in lines}
    assert 1 <= len(lines) == len(workers) <= 2 and all("lists and maps in Redis keep their last copy" in line for line in lines), lines

