"""The stages of one SMTP session, in the order the MTA reports them.

`Session` is the one pipeline every face drives: the milter adapter calls
its steps from pymilter's callbacks, and `Engine.evaluate` (the CLI's
`scan`, `corpus`, `bench`) calls the same steps in the same order for a
message read from a file.  Which stages run, when a verdict taken early is
final, and what a refused recipient does to the transaction are decided
here and only here, so that `scan --explain` shows what the milter does.

Each step returns None to go on, or a Verdict that ends the step: a
recipient refused alone (`verdict.rcpt` set), or a message settled before
its end (a symbol with a fixed reject, tempfail or discard action, while
`actions.early_reject` is on).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from milterguard.model import Action, Connection, Hits, Stage, Transaction, Verdict

if TYPE_CHECKING:  # pragma: no cover
    from milterguard.engine.core import Engine

# Applied actions that end a session before end of message.
FINAL_EARLY = (Action.REJECT, Action.TEMPFAIL, Action.DISCARD)


class Session:
    """One SMTP connection as the engine sees it: a Connection, then a Transaction per message."""

    def __init__(self, engine: "Engine", conn: Connection) -> None:
        self.engine = engine
        self.conn = conn
        conn.hits = engine.new_hits()
        self.txn: Transaction | None = None
        self.hits: Hits | None = None
        self.early: Verdict | None = None  # a verdict taken before end of message

    # ------------------------------------------------------------ helpers

    def _run(self, stage: Stage) -> None:
        hits = self.hits if self.txn is not None else self.conn.hits
        verdict = self.engine.run_stage(stage, self.conn, self.txn, hits)
        if verdict is not None and self.early is None:
            self.early = verdict

    def decided(self) -> Verdict | None:
        """The verdict taken early, when what it applies ends the session now."""
        verdict = self.early
        if verdict is None or verdict.applied not in FINAL_EARLY:
            return None
        verdict.elapsed = time.monotonic() - (self.txn.started if self.txn is not None else time.monotonic())
        return verdict

    # ------------------------------------------------------------ the steps

    def connect(self) -> Verdict | None:
        self._run(Stage.CONNECT)
        return self.decided()

    def helo(self, name: str) -> Verdict | None:
        self.conn.helo = name
        self._run(Stage.HELO)
        return self.decided()

    def mail_from(self, txn: Transaction) -> Verdict | None:
        """A new message: TXN holds the sender (and no recipient yet)."""
        self.reset()
        self.txn = txn
        self.hits = self.engine.start_transaction(self.conn, txn)
        self._run(Stage.MAIL_FROM)
        return self.decided()

    def rcpt(self, address: str) -> Verdict | None:
        """One recipient.  A verdict with `rcpt` set refuses this recipient alone: the
        transaction forgets it and its hits, and goes on with the others."""
        settled = self.decided()
        if settled is not None:
            return settled
        self.txn.rcpts.append(address)
        self._run(Stage.RCPT)
        settled = self.decided()
        if settled is not None and settled.rcpt:
            self.txn.rcpts.pop()
            self.early = None
        return settled

    def end_of_headers(self) -> Verdict | None:
        self._run(Stage.HEADERS)
        return self.decided()

    def end_of_message(self) -> Verdict:
        """The final verdict: the body's stage, composites and scoring."""
        return self.engine.finish(self.conn, self.txn, self.hits)

    def reset(self) -> None:
        """The transaction is over (end of message or abort); the connection goes on."""
        self.txn = None
        self.hits = None
        if self.early is not None and self.early.stage >= Stage.MAIL_FROM:
            self.early = None  # a connection-level verdict outlives the transaction


def run_session(engine: "Engine", conn: Connection, txn: Transaction) -> Verdict:
    """A whole session for one message, as the MTA would report it: the CLI's path.

    CONN has the client (and HELO); TXN the sender, recipients, headers and
    body.  Returns the verdict the milter would have acted on: the first that
    ended the session, else the one at end of message.  Recipients refused
    alone are listed in `verdict.refused`.
    """
    session = Session(engine, conn)
    rcpts, txn.rcpts = list(txn.rcpts), []
    headers, body, body_size = txn.headers, txn.body, txn.body_size
    txn.headers, txn.body, txn.body_size = [], b"", 0
    refused: list[Verdict] = []
    verdict = session.connect() or session.helo(conn.helo) or session.mail_from(txn)
    for rcpt in rcpts:
        if verdict is not None:
            break
        verdict = session.rcpt(rcpt)
        if verdict is not None and verdict.rcpt:
            refused.append(verdict)
            verdict = None
    if verdict is None and refused and not txn.rcpts:
        verdict = refused.pop()  # every recipient refused: no message follows
    if verdict is None:
        txn.headers = headers
        verdict = session.end_of_headers()
    if verdict is None:
        txn.body, txn.body_size = body, body_size
        verdict = session.end_of_message()
    verdict.refused = refused
    return verdict
