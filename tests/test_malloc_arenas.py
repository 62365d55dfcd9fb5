"""milter.malloc_arenas: a worker's threads share at most that many malloc arenas.

libmilter runs every session in a thread of its own; glibc gives a thread
that finds the arenas busy a new one, up to eight per core, and each arena
keeps the free memory of the largest messages it served.  In the memory
soak (bench/soak.py) a worker had 16 arenas holding 136 MB for 38 MB in use.
"""

from __future__ import annotations

import smtplib
import subprocess
import sys
from pathlib import Path

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


# --- end to end: `milterguard serve` applies the setting to its workers -------------------

HEAP_MAX = 64 << 20  # glibc's HEAP_MAX_SIZE on 64-bit: each thread arena is one such aligned reservation


def thread_arenas(pid: int) -> int:
    """The thread arenas of a running process, read from its memory map.

    glibc reserves each arena's heap as an anonymous mapping of HEAP_MAX bytes
    aligned on HEAP_MAX, readable and writable as far as it is used and
    inaccessible beyond: one such aligned reservation is one arena (the main
    arena lives in the brk heap and is not counted).
    """
    regions = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5:
            continue  # a file or a named mapping ([stack], [heap])
        start, end = (int(x, 16) for x in fields[0].split("-"))
        regions.append((start, end, fields[1]))
    found = 0
    for i, (start, end, perms) in enumerate(regions):
        if start % HEAP_MAX or not perms.startswith("rw"):
            continue
        stop = end
        if stop - start < HEAP_MAX and i + 1 < len(regions) and regions[i + 1][0] == end \
                and regions[i + 1][2].startswith("---"):
            stop = regions[i + 1][1]
        found += stop - start == HEAP_MAX
    return found


def open_sessions(port: int, count: int) -> list[smtplib.SMTP]:
    """COUNT SMTP sessions open at once, each past RCPT: Postfix holds a milter session per connection."""
    sessions = []
    for n in range(count):
        smtp = smtplib.SMTP("127.0.0.1", port, timeout=30, local_hostname="client.example.org")
        smtp.ehlo()
        smtp.mail(f"sender{n}@example.org")
        smtp.rcpt("rcpt@example.net")
        sessions.append(smtp)
    return sessions


def body(n: int) -> bytes:
    text = "".join(f"line {i} of message {n}, long enough to be read in chunks by libmilter\r\n"
                   for i in range(3000))
    return (f"From: sender{n}@example.org\r\nTo: rcpt@example.net\r\nSubject: arena {n}\r\n"
            f"Message-ID: <arena{n}@example.org>\r\n\r\n{text}").encode()


@pytest.mark.postfix
@pytest.mark.parametrize("limit", [2, 0])
def test_serve_applies_the_bound_to_its_workers(limit, milterguard_factory, postfix_factory):
    mg = milterguard_factory(workers=1, sets={"milter.malloc_arenas": str(limit)})
    pf = postfix_factory(mg.socket)
    sessions = open_sessions(pf.smtpd_port, 8)
    try:
        for n, smtp in enumerate(sessions):
            smtp.data(body(n))
    finally:
        for smtp in sessions:
            smtp.quit()
    assert len(mg.wait_for_verdicts(8, timeout=60)) == 8
    (worker,) = mg.worker_pids()
    arenas = thread_arenas(worker)
    if limit:
        # M_ARENA_MAX counts the main arena: one thread arena is left for the sessions.
        assert arenas <= limit - 1, mg.log_tail()
    else:
        # glibc's default: the eight session threads, alive at once, made arenas of their own.
        assert arenas > 2, mg.log_tail()
