"""Shared fixtures: real servers on loopback, each in tmp_path (STYLE.md 10).

- ``sink``: :class:`support.sink.SmtpSink`, where Postfix relays to.
- ``postfix_factory(milter, **kw)``: start a private Postfix whose
  ``smtpd_milters`` is *milter* (libmilter ``inet:PORT@HOST``, Postfix
  ``inet:HOST:PORT`` or ``unix:PATH``; None = no milter) relaying to
  ``sink``.  Keywords go to :class:`support.postfix.PostfixInstance`.
- ``noop_milter``: the no-op pymilter milter, running.
- ``milterguard_factory(**kw)``: start ``milterguard serve``; keywords go
  to :class:`support.milterguard_proc.MilterguardProcess`.
- ``milterguard``: ``milterguard_factory()`` with defaults.
- ``postfix``: ``postfix_factory(milterguard.socket)``.

Every fixture stops what it started, also when the test fails.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

# Every Python process of the tests reports traffic beyond loopback (support/netguard).
_NETGUARD = str(Path(_TESTS) / "support" / "netguard")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_NETGUARD, os.environ.get("PYTHONPATH", "")) if p)
os.environ.setdefault("MILTERGUARD_TEST_NETLOG", os.path.join(tempfile.mkdtemp(prefix="mg-netguard-"), "net.log"))
if _NETGUARD not in sys.path:
    sys.path.insert(0, _NETGUARD)
import sitecustomize as _netguard  # noqa: E402,F401  (installs the hook in this process too)

from support.milterguard_proc import MilterguardProcess  # noqa: E402
from support.noop_milter import NoopMilterProcess  # noqa: E402
from support.postfix import PostfixInstance, postfix_available  # noqa: E402
from support.sink import SmtpSink  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def dns_that_knows_nothing(tmp_path_factory):
    """Point every milterguard of the tests at a local DNS server with no data.

    The system's resolver is not loopback: lookups of the domains in test
    messages and corpus mail would leave the machine.  This nsd answers
    REFUSED at once for every name, so the checks report "no record" or a
    DNS error without waiting; the zones of the blocklists that are on by
    default are served empty, so they answer "not listed".  Tests about DNS start servers of their own
    and name them with --set dns.nameservers=..., which wins over this file.
    """
    from support.dns import NsdServer, Zone, nsd_available

    workdir = tmp_path_factory.mktemp("dns-nothing")
    conf = workdir / "dns.yaml"
    server = None
    if nsd_available() is None:
        # The blocklists on by default (Spamhaus ZEN and DBL) answer "not listed" here.
        server = NsdServer(workdir / "nsd", [Zone("test.invalid."), Zone("spamhaus.org.")]).start()
        conf.write_text(f"dns:\n  nameservers: ['{server.address}']\n")
    else:
        conf.write_text("dns:\n  enabled: false\n")
    old = os.environ.get("MILTERGUARD_CONFIG")
    os.environ["MILTERGUARD_CONFIG"] = os.pathsep.join(p for p in (str(conf), old) if p)
    try:
        yield server
    finally:
        if old is None:
            os.environ.pop("MILTERGUARD_CONFIG", None)
        else:
            os.environ["MILTERGUARD_CONFIG"] = old
        if server is not None:
            server.stop()


@pytest.fixture(autouse=True)
def loopback_only():
    """Fail a test during which any of its Python processes talked to a non-loopback address."""
    log = Path(os.environ["MILTERGUARD_TEST_NETLOG"])
    before = log.stat().st_size if log.exists() else 0
    yield
    if log.exists() and log.stat().st_size > before:
        with open(log) as fh:
            fh.seek(before)
            report = fh.read()
        pytest.fail("traffic beyond loopback:\n" + report[:4000], pytrace=False)


def _stop_all(things, errors_ok: bool = False) -> None:
    """Stop everything, newest first; raise the first error at the end."""
    first: BaseException | None = None
    for thing in reversed(things):
        try:
            thing.stop()
        except BaseException as e:  # keep stopping the others
            first = first or e
    if first is not None and not errors_ok:
        raise first


@pytest.fixture
def sink():
    """An SMTP sink on 127.0.0.1 (free port) storing messages in memory."""
    with SmtpSink() as s:
        yield s


@pytest.fixture
def postfix_factory(tmp_path, sink):
    """``make(milter, *, name=None, relay_port=None, **kw) -> PostfixInstance``.

    Each instance lives in ``tmp_path/<name>`` (default ``postfix``,
    ``postfix1``, ...), is started before it is returned, and is stopped
    at teardown.  ``relay_port`` defaults to the ``sink`` fixture.
    """
    reason = postfix_available()
    if reason:
        pytest.skip(reason)
    started: list[PostfixInstance] = []

    def make(milter: str | None, *, name: str | None = None, relay_port: int | None = None,
             **kw) -> PostfixInstance:
        if milter is not None and hasattr(milter, "socket"):
            milter = milter.socket  # a MilterProcess was passed
        workdir = tmp_path / (name or ("postfix" if not started else f"postfix{len(started)}"))
        pf = PostfixInstance(workdir, milter=milter,
                             relay_port=relay_port if relay_port is not None else sink.port, **kw)
        started.append(pf)
        pf.start()
        return pf

    try:
        yield make
    finally:
        _stop_all(started)


@pytest.fixture
def noop_milter(tmp_path):
    """The no-op pymilter milter (``-v``: it logs each callback), running.

    ``.socket`` is libmilter notation for miltertest, ``.postfix_socket``
    Postfix's; ``.stop()``/``.start()``/``.restart()`` keep the port.
    """
    proc = NoopMilterProcess(tmp_path / "noop_milter")
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def milterguard_factory(tmp_path):
    """``make(**kw) -> MilterguardProcess``, started; all stopped at teardown.

    Keywords: sets, extra_args, config_text, rules, socket, workers, env,
    and ``name`` (the workdir under tmp_path; default ``milterguard``,
    ``milterguard1``, ...).  ``start=False`` returns it unstarted.
    """
    made: list[MilterguardProcess] = []

    def make(*, name: str | None = None, start: bool = True, **kw) -> MilterguardProcess:
        workdir = tmp_path / (name or ("milterguard" if not made else f"milterguard{len(made)}"))
        mg = MilterguardProcess(workdir, **kw)
        made.append(mg)
        if start:
            mg.start()
        return mg

    try:
        yield make
    finally:
        _stop_all(made)


@pytest.fixture
def milterguard(milterguard_factory):
    """``milterguard serve`` with the default configuration."""
    return milterguard_factory()


@pytest.fixture
def postfix(postfix_factory, milterguard):
    """A private Postfix with ``smtpd_milters`` = the ``milterguard`` fixture."""
    return postfix_factory(milterguard.socket)



@pytest.fixture(scope="session")
def debian_package(tmp_path_factory):
    """The .deb built from this checkout (once per run), or $MILTERGUARD_TEST_DEB.

    The tests that install it need root and the build tools; they are skipped
    without them, and when a milterguard package is installed already (they
    install and purge their own).
    """
    from support import package

    reason = package.missing()
    if reason:
        pytest.skip(reason)
    if package.installed_version():
        pytest.skip("a milterguard package is installed on this machine; these tests install and purge their own")
    given = os.environ.get("MILTERGUARD_TEST_DEB")
    if given:
        return Path(given)
    if package.tree_files() is None:
        pytest.skip("not a git checkout: cannot tell the source files from a build's")
    return package.build(tmp_path_factory.mktemp("deb"))
