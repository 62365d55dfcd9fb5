"""The milter adapter: records what the MTA reports and applies verdicts.

It builds the Connection and Transaction, drives the engine's stage
pipeline (engine/pipeline.py, the same one `milterguard scan` drives) from
pymilter's callbacks, and turns each Verdict into milter actions.  It
imports no check and takes no decision of its own.  The
callbacks that need no answer are declared `noreply`, which saves a round
trip with the MTA for each of them (each header above all).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import tempfile
import threading
import time
import traceback

import Milter

from milterguard.engine.core import Engine
from milterguard.engine.pipeline import Session
from milterguard.model import Action, Connection, Transaction, Verdict
from milterguard.explain import explain_text, log_record
from milterguard import metrics
from milterguard.mail.raw import edited_headers, raw_message
from milterguard.settings import node_name

log = logging.getLogger("milterguard.milter")

_ids = itertools.count(1)


class Sessions:
    """Open SMTP sessions of this process, so that a stopping worker can drain them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = 0
        self._idle = threading.Condition(self._lock)

    def opened(self) -> None:
        with self._lock:
            self._open += 1
        metrics.session_opened()

    def closed(self) -> None:
        with self._lock:
            self._open = max(0, self._open - 1)
            if self._open == 0:
                self._idle.notify_all()
        metrics.session_closed()

    @property
    def open(self) -> int:
        return self._open

    def wait_idle(self, timeout: float) -> bool:
        with self._lock:
            return self._idle.wait_for(lambda: self._open == 0, timeout)


SESSIONS = Sessions()


def _text(value: str | bytes | None) -> str:
    """MTA strings arrive with undecodable bytes escaped; make them safe to match and log."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if value.isascii():
        return value  # nothing escaped: the round trip below would give it back unchanged
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _addr(value: str) -> str:
    value = _text(value).strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    return value


class MilterguardMilter(Milter.Base):
    """One instance per SMTP connection."""

    # Set by the worker; replaced as a whole on reload.  A connection keeps the
    # engine it started with.
    current_engine: Engine | None = None

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.conn: Connection | None = None
        self.session: Session | None = None
        self.failed: str = ""  # set when the filter itself failed in a callback that cannot answer
        self._failure_counted = ""  # the failure the metrics have counted already (answered more than once)
        self.spool = None
        self.message_id = ""
        self._counted = False

    def negotiate(self, opts):
        """Option negotiation: the macros each stage needs, and no reply where none is due.

        pymilter 1.0.5's own hands the macro lists to libmilter as bytes, which
        its setsymlist refuses with a TypeError; it then falls back to the
        defaults, so that neither the macro lists nor the no-reply steps are
        negotiated, and the MTA waits for an answer to every header.  This is
        the same negotiation with the lists passed as text.
        """
        try:
            actions, offered, _f1, _f2 = opts
            self._actions = actions
            if actions & Milter.SETSYMLIST:
                for stage, macros in _SYMLISTS:
                    self._ctx.setsymlist(stage, macros)
            opts[1] = self._protocol = offered & ~self.protocol_mask()
            opts[2] = 0
            opts[3] = 0
        except Exception:  # noqa: BLE001 - the MTA's defaults still work, only slower
            log.warning("milter option negotiation failed, using the MTA's defaults: %s",
                        traceback.format_exc().strip().replace("\n", " | "))
            return Milter.ALL_OPTS
        return Milter.CONTINUE

    # ------------------------------------------------------------ helpers

    @property
    def txn(self) -> Transaction | None:
        return self.session.txn if self.session is not None else None

    def _ref(self) -> str:
        if self.txn is not None and self.txn.queue_id:
            return self.txn.queue_id
        return self.conn.ident if self.conn else "?"

    def _macro(self, name: str) -> str:
        try:
            value = self.getsymval(name)
        except (Milter.milter.error, AttributeError, TypeError, UnicodeDecodeError):
            # pymilter decodes macros strictly; a macro that is not UTF-8 is as good as absent.
            return ""
        return _text(value) if value else ""

    def _fail(self, where: str) -> None:
        """An internal error of the filter: log it once, and answer by on_error later."""
        log.error("internal error in %s for %s: %s", where, self._ref(), traceback.format_exc().strip().replace("\n", " | "))
        self.failed = where

    def _on_error(self) -> int:
        engine = self.engine or MilterguardMilter.current_engine
        authenticated = bool(self.conn and self.conn.authenticated)
        key = "actions.on_error.authenticated" if authenticated else "actions.on_error.unauthenticated"
        policy = engine.config[key] if engine else "tempfail"
        log.warning("on_error=%s for %s (failed in %s)", policy, self._ref(), self.failed)
        if self._failure_counted != self.failed:
            metrics.record_error(self.failed)
            self._failure_counted = self.failed
        if policy == "accept":
            return Milter.ACCEPT
        self._reply("451", "4.3.0", engine.config["actions.tempfail_text"] if engine else "Try again later (ref {ref})")
        return Milter.TEMPFAIL

    def _reply(self, code: str, status: str, text: str) -> None:
        # libmilter silently drops a reply with a single %, so none may slip in.
        message = text.replace("{ref}", self._ref()).replace("%", "%%")
        try:
            self.setreply(code, status, message)
        except (Milter.milter.error, ValueError) as exc:
            log.warning("setreply failed for %s: %s", self._ref(), exc)

    def _answer(self, verdict: Verdict | None) -> int | None:
        """The milter answer for a verdict that ends a step (logged once), or None to go on."""
        if verdict is None:
            return None
        if not verdict.logged:
            self._log(verdict)
            verdict.logged = True
        cfg = self.engine.config
        if verdict.applied == Action.REJECT:
            self._reply(cfg["actions.reject_code"], cfg["actions.reject_status"], cfg["actions.reject_text"])
            return Milter.REJECT
        if verdict.applied == Action.DISCARD:
            return Milter.DISCARD
        self._reply("451", "4.7.1", cfg["actions.tempfail_text"])
        return Milter.TEMPFAIL

    def _log(self, verdict: Verdict) -> None:
        metrics.record_verdict(verdict)
        conn, txn = self.conn, self.txn
        log.info(
            "%s",
            log_record(
                verdict,
                max_bytes=self.engine.config["log.verdict_max_bytes"],
                node=node_name(self.engine.config),
                queue_id=txn.queue_id if txn else "",
                message_id=self.message_id,
                client=conn.client_ip or "local",
                client_name=conn.client_name,
                helo=conn.helo,
                auth=conn.auth_user or None,
                **{"from": txn.mail_from if txn else None},
                rcpts=txn.rcpts if txn else [],
                mode=verdict.mode,
            ),
        )
        if self.engine.config["history.enabled"]:
            self._record(verdict)

    def _record(self, verdict: Verdict) -> None:
        """One row of the history for this verdict, queued for the process's writer thread."""
        try:
            from milterguard.stores.history import row

            conn, txn = self.conn, self.txn
            header = {name.lower(): value for name, value in reversed(txn.headers)} if txn else {}
            _recorder(self.engine.config).record(row(
                at=time.time(), node=node_name(self.engine.config), queue_id=txn.queue_id if txn else "",
                client_ip=conn.client_ip or "", client_name=conn.client_name, sender=txn.mail_from if txn else "",
                rcpts=txn.rcpts if txn else [], subject=header.get("subject", ""), score=verdict.score,
                action=verdict.applied.label,
                symbols=[{"name": h.symbol, "weight": round(h.weight, 3), "options": list(h.options)}
                         for h in verdict.hits],
                explain=explain_text(verdict)))
        except Exception:  # noqa: BLE001 - the history never costs a message its answer
            log.exception("history: the verdict of %s was not recorded", self._ref())

    def _reset(self) -> None:
        if self.spool is not None:
            self.spool.close()
        self.spool = None
        self.message_id = ""
        if self.session is not None:
            self.session.reset()

    # ------------------------------------------------------------ callbacks

    @Milter.noreply
    def connect(self, hostname, family, hostaddr):
        SESSIONS.opened()
        self._counted = True
        self.engine = MilterguardMilter.current_engine
        try:
            ip, port = None, None
            if family in (socket.AF_INET, socket.AF_INET6) and isinstance(hostaddr, tuple):
                ip, port = hostaddr[0], hostaddr[1]
                if ip.lower().startswith("::ffff:") and "." in ip:
                    ip = ip[7:]
            self.conn = Connection(
                client_ip=ip, client_port=port, client_name=_text(hostname), ident=f"conn-{next(_ids)}",
            )
            for macro in ("j", "{daemon_name}", "{if_addr}"):
                value = self._macro(macro)
                if value:
                    self.conn.macros[macro] = value
            self.session = self.engine.session(self.conn)
            self.session.connect()  # no reply here: a verdict that ends the session answers the first RCPT
        except Exception:  # noqa: BLE001 - must never break the session
            self._fail("connect")
        return Milter.CONTINUE

    def _ensure_conn(self) -> None:
        """Build the connection from macros when the connect callback never arrived.

        That happens when pymilter could not decode the client's host name.
        """
        if self.conn is not None:
            return
        if not self._counted:
            SESSIONS.opened()
            self._counted = True
        self.engine = self.engine or MilterguardMilter.current_engine
        ip = self._macro("{client_addr}") or None
        self.conn = Connection(client_ip=ip, client_name=self._macro("{client_name}") or (f"[{ip}]" if ip else ""),
                               ident=f"conn-{next(_ids)}")
        self.session = self.engine.session(self.conn)
        self.session.connect()

    @Milter.noreply
    def hello(self, hostname):
        if self.failed:
            return Milter.CONTINUE
        try:
            self._ensure_conn()
            self.conn.tls_version = self._macro("{tls_version}")
            self.conn.tls_cipher = self._macro("{cipher}")
            self.session.helo(_text(hostname))
        except Exception:  # noqa: BLE001
            self._fail("helo")
        return Milter.CONTINUE

    @Milter.noreply
    def envfrom(self, mailfrom, *params):
        if self.failed:
            return Milter.CONTINUE
        try:
            self._ensure_conn()
            self._reset()
            self.conn.auth_user = self._macro("{auth_authen}")
            txn = Transaction(mail_from=_addr(mailfrom), mail_params=Milter.param2dict(list(params)) if params else {})
            txn.queue_id = self._macro("i")
            self.session.mail_from(txn)
        except Exception:  # noqa: BLE001
            self._fail("envfrom")
        return Milter.CONTINUE

    def envrcpt(self, to, *params):
        if self.failed:
            return self._on_error()
        try:
            answer = self._answer(self.session.rcpt(_addr(to)))
            if answer is not None:
                return answer
        except Exception:  # noqa: BLE001
            self._fail("envrcpt")
            return self._on_error()
        return Milter.CONTINUE

    @Milter.noreply
    def data(self):
        if self.txn is not None and not self.txn.queue_id:
            self.txn.queue_id = self._macro("i")
        return Milter.CONTINUE

    def header_bytes(self, name, value):
        """pymilter's entry for each header, the value still bytes: decoded once, by `header`.

        (pymilter's own would decode it with surrogate escapes, which `_text` undoes again.)
        """
        return self.header(name, value)

    @Milter.noreply
    def header(self, name, value):
        if self.failed or self.txn is None:
            return Milter.CONTINUE
        try:
            name = _text(name)
            value = _text(value)
            self.txn.headers.append((name, value))
            if name.lower() == "message-id":
                self.message_id = value.strip().strip("<>")
        except Exception:  # noqa: BLE001
            self._fail("header")
        return Milter.CONTINUE

    def eoh(self):
        if self.failed:
            return self._on_error()
        try:
            if not self.txn.queue_id:
                self.txn.queue_id = self._macro("i")
            answer = self._answer(self.session.end_of_headers())
            if answer is not None:
                return answer
            cfg = self.engine.config
            self.spool = tempfile.SpooledTemporaryFile(max_size=cfg["message.spool_bytes"], dir=cfg["message.spool_dir"] or None)
        except Exception:  # noqa: BLE001
            self._fail("eoh")
            return self._on_error()
        return Milter.CONTINUE

    @Milter.noreply
    def body(self, chunk):
        if self.failed or self.spool is None:
            return Milter.CONTINUE
        try:
            self.spool.write(chunk)
        except OSError:
            self._fail("body")
        return Milter.CONTINUE

    def eom(self):
        if self.failed:
            answer = self._on_error()
            self._reset()
            return answer
        try:
            txn = self.txn
            if not txn.queue_id:
                txn.queue_id = self._macro("i")
            txn.body_size = self.spool.tell() if self.spool is not None else 0
            txn.body = self.spool if self.spool is not None else b""
            answer = self._apply(self.session.end_of_message())
        except Exception:  # noqa: BLE001
            self._fail("eom")
            answer = self._on_error()
        self._reset()
        return answer

    def _apply(self, verdict: Verdict) -> int:
        """The final verdict: the answer, and the recipients and headers it changes."""
        if verdict.applied in (Action.REJECT, Action.TEMPFAIL, Action.DISCARD):
            return self._answer(verdict)
        self._log(verdict)
        verdict.logged = True
        if verdict.applied == Action.REVIEW and verdict.quarantine == "store":
            from milterguard.stores.quarantine import QuarantineError

            try:
                self._store(verdict)
                metrics.dependency("quarantine", "quarantine", True)
                # Stored: the client gets 250 and the MTA delivers nothing (release re-injects it).
                return Milter.DISCARD
            except QuarantineError as exc:
                metrics.dependency("quarantine", "quarantine", False)
                # Never accept and drop: the sender retries on a tempfail; with on_error accept
                # the MTA's hold queue keeps it instead.
                self.failed = f"the quarantine store ({exc})"
                answer = self._on_error()
                if answer != Milter.ACCEPT:
                    return answer
                verdict.quarantine = "mta-hold"
        for rcpt, why in verdict.drop_rcpts.items():
            log.info("recipient %s removed from %s: %s", rcpt, self._ref(), why)
            self.delrcpt(f"<{rcpt}>")
        edits = verdict.edits
        if edits is not None:
            for name, index in edits.remove:
                self.chgheader(name, index, None)
            for name, value in edits.prepend:
                self.addheader(name, value, 0)
            for name, value in edits.add:
                self.addheader(name, value)
            if edits.subject is not None:
                if any(name.lower() == "subject" for name, _value in self.txn.headers):
                    self.chgheader("Subject", 1, edits.subject)
                else:
                    self.addheader("Subject", edits.subject)
        if verdict.applied == Action.REVIEW:
            self.quarantine(f"milterguard review: score {verdict.score:.2f} ({verdict.reason})")
        return Milter.ACCEPT

    def _store(self, verdict: Verdict) -> None:
        """Keep the message in the quarantine as the MTA would have delivered it (our headers added)."""
        from milterguard.stores.quarantine import Held

        conn, txn = self.conn, self.txn
        raw = raw_message(edited_headers(txn.headers, verdict.edits), txn.body)
        header = {name.lower(): value for name, value in reversed(txn.headers)}  # the first of each name
        held = Held(
            sender=txn.mail_from, rcpts=[rcpt for rcpt in txn.rcpts if rcpt not in verdict.drop_rcpts],
            client_ip=conn.client_ip or "", client_name=conn.client_name, helo=conn.helo, queue_id=txn.queue_id,
            mail_params=dict(txn.mail_params), subject=header.get("subject", ""), from_header=header.get("from", ""),
            score=verdict.score, action=verdict.action.label, explain=explain_text(verdict),
            symbols=[{"name": h.symbol, "weight": round(h.weight, 3), "options": list(h.options)} for h in verdict.hits],
        )
        ident = _quarantine(self.engine.config).add(held, raw)
        log.info("%s stored in the quarantine as %s (%d bytes)", self._ref(), ident, len(raw))

    def abort(self):
        self._reset()
        self.failed = self._failure_counted = ""
        return Milter.CONTINUE

    @Milter.noreply
    def unknown(self, cmd):
        return Milter.CONTINUE

    def close(self):
        self._reset()
        if self._counted:
            self._counted = False
            SESSIONS.closed()
        return Milter.CONTINUE


_STORES: dict = {}
_STORES_LOCK = threading.Lock()


def _quarantine(config):
    """This process's quarantine store for the configuration (opened at first use, after the fork).

    One per process: sessions run in threads, and two threads opening it at once made two
    engines, the second one's set-up racing the first one's connections.
    """
    from milterguard.stores.quarantine import open_quarantine

    key = (os.getpid(), config["quarantine.url"], config["node.name"])
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None:
            store = _STORES[key] = open_quarantine(config)
    return store


_RECORDERS: dict = {}


def _recorder(config):
    """This process's history writer (stores/history.py), made at first use, after the fork."""
    from milterguard.stores.history import Recorder

    key = (os.getpid(), config["quarantine.url"], config["node.name"])
    with _STORES_LOCK:
        found = _RECORDERS.get(key)
        if found is None:
            found = _RECORDERS[key] = Recorder(config, node_name(config), lambda: _quarantine(config).engine)
    return found


# Macros asked of the MTA at each stage (Sendmail honours the list; Postfix sends
# what milter_*_macros name, whose defaults include these).
for _stage, _macros in (
    ("connect", ("j", "{daemon_name}", "{if_addr}", "{client_addr}", "{client_name}")),
    ("hello", ("{tls_version}", "{cipher}")),
    ("envfrom", ("i", "{auth_type}", "{auth_authen}", "{mail_addr}")),
    ("envrcpt", ("{rcpt_addr}",)),
    ("eoh", ("i",)),
    ("eom", ("i",)),
):
    Milter.symlist(*_macros)(getattr(MilterguardMilter, _stage))
# What negotiate hands to libmilter: (stage, "macro macro ...").
_SYMLISTS = tuple((Milter.MACRO_CALLBACKS[name], " ".join(getattr(MilterguardMilter, name)._symlist))
                  for name in Milter.MACRO_CALLBACKS if getattr(getattr(MilterguardMilter, name), "_symlist", None))
