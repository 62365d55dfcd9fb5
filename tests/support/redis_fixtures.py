"""pytest fixtures for a real Redis master and replica; import them into a test module:

    from support.redis_fixtures import master, replica  # noqa: F401  (fixtures)
"""

from __future__ import annotations

import pytest

from support.redis import RedisServer


@pytest.fixture
def master(tmp_path):
    """A redis-server master on a free loopback port, stopped at teardown."""
    server = RedisServer.start(tmp_path / "master")
    yield server
    server.stop()


@pytest.fixture
def replica(tmp_path, master):
    """A replica of `master`, in sync before the test starts."""
    server = RedisServer.start(tmp_path / "replica", replica_of=master)
    server.wait_synced()
    yield server
    server.stop()
