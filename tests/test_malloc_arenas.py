"""milter.malloc_arenas: a worker's threads share at most that many malloc arenas.

libmilter runs every session in a thread of its own; glibc gives a thread
that finds the arenas busy a new one, up to eight per core, and each arena
keeps the free memory of the largest messages it served.  In the memory
soak (bench/soak.py) a worker had 16 arenas holding 136 MB for 38 MB in use.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from milterguard import settings as S
from milterguard.server import limit_malloc_arenas

# Eight threads alive at once, each allocating through malloc (blocks above
# pymalloc's 512 bytes and below the 128 KiB mmap threshold), as eight
# sessions of one worker do; then glibc's own count of its arenas.
PROGRAM = """
import ctypes, sys, threading
from milterguard.server import limit_malloc_arenas
if int(sys.argv[1]):
    assert limit_malloc_arenas(int(sys.argv[1]))
barrier = threading.Barrier(8)
def session():
    barrier.wait()
    held = [bytearray(64 * 1024) for _ in range(16)]
    barrier.wait()
    del held
threads = [threading.Thread(target=session) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
sys.stderr.flush()
ctypes.CDLL(None).malloc_stats()
"""


def arenas(limit: int) -> int:
    out = subprocess.run([sys.executable, "-c", PROGRAM, str(limit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return sum(1 for line in out.stderr.splitlines() if line.startswith("Arena "))


@pytest.fixture(autouse=True)
def glibc_only():
    if not limit_malloc_arenas(0):  # 0 changes nothing; False where there is no mallopt
        pytest.skip("not glibc: no mallopt(M_ARENA_MAX)")


def test_eight_sessions_share_at_most_the_configured_arenas():
    assert S.BY_KEY["milter.malloc_arenas"].default == 2
    assert arenas(2) <= 2


def test_without_the_bound_each_session_thread_gets_an_arena():
    # The case the setting exists for: glibc's default gives the eight threads their own.
    assert arenas(0) > 2
