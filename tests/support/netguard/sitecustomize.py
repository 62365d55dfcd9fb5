"""Loopback guard for the test suite: report any traffic to a non-loopback address.

The tests put this directory on PYTHONPATH, so every Python process they start
(the milter under test, the no-op milter, helpers) loads this module at start-up
and installs an audit hook.  A connect, sendto or name lookup aimed anywhere but
127.0.0.0/8, ::1, "localhost" or a unix socket is written, with a short stack, to
the file named by MILTERGUARD_TEST_NETLOG; conftest.py fails the test that caused
it.  The call itself goes on: the guard reports, it does not change behaviour.
"""

from __future__ import annotations

import os
import sys

_LOG = os.environ.get("MILTERGUARD_TEST_NETLOG")
_EVENTS = {"socket.connect", "socket.sendto", "socket.getaddrinfo", "socket.gethostbyname",
           "socket.gethostbyname_ex", "socket.gethostbyaddr"}


def _loopback(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return True  # not an address family we judge
    host = host.strip("[]").split("%", 1)[0]
    if host in ("", "localhost", "localhost.localdomain") or host.endswith(".localhost"):
        return True
    import socket

    if host == socket.gethostname():
        return True  # the machine's own name, from /etc/hosts
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: resolving it asks the system's resolver


def _target(event: str, args: tuple):
    if event in ("socket.connect", "socket.sendto"):
        address = args[1]
        if isinstance(address, tuple) and address:
            return address[0]
        return None  # unix socket path, or netlink
    if event == "socket.getaddrinfo":
        return args[0]
    return args[0] if args else None


def _hook(event: str, args: tuple) -> None:
    if event not in _EVENTS:
        return
    try:
        host = _target(event, args)
        if host is None or _loopback(host):
            return
        import traceback

        stack = "".join(traceback.format_stack(limit=8)[:-1])
        with open(_LOG, "a") as fh:
            fh.write(f"pid {os.getpid()} {event} {host!r} ({' '.join(sys.argv[:3])})\n{stack}\n")
    except Exception:
        pass  # the guard must never break the process it watches


if _LOG:
    sys.addaudithook(_hook)
