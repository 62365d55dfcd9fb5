"""Connection and transaction state, hits and verdicts.

A `Connection` lives for one SMTP connection; a `Transaction` is created
at each MAIL FROM and dropped at end of message or abort.  Front ends (the
milter adapter, the CLI) only fill these objects with facts; the engine
reads them.
"""

from __future__ import annotations

import enum
import ipaddress
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from milterguard.mail.message import Message


class Stage(enum.IntEnum):
    """SMTP stages in the order the MTA reports them."""

    CONNECT = 1
    HELO = 2
    MAIL_FROM = 3
    RCPT = 4
    HEADERS = 5  # end of headers
    EOM = 6  # end of message: body, MIME, URIs
    FINAL = 7  # after every other check: composites

    @property
    def label(self) -> str:
        return _STAGE_LABELS[self]


_STAGE_LABELS = {stage: stage.name.lower() for stage in Stage}  # asked per stage and per log line


@dataclass
class Connection:
    """What is known about the SMTP client for the whole connection."""

    client_ip: str | None = None  # None for a local (unix socket) client
    client_port: int | None = None
    client_name: str = ""  # PTR name as the MTA reports it, or "[ip]"
    helo: str = ""
    tls_version: str = ""
    tls_cipher: str = ""
    auth_user: str = ""  # SASL login name, empty when not authenticated
    macros: dict[str, str] = field(default_factory=dict)
    ident: str = ""  # a short id for log lines before the queue id is known
    hits: "Hits | None" = None  # hits of the connect and HELO stages
    timings: dict[str, float] = field(default_factory=dict)
    # Results that one check leaves for later ones (DNS lookups of the client, say),
    # keyed by the name of the check that made them.
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def authenticated(self) -> bool:
        return bool(self.auth_user)

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        # Many checks ask; parse client_ip once (and again only if it changes).
        cached = self.__dict__.get("_ip")
        if cached is not None and cached[0] == self.client_ip:
            return cached[1]
        value = None
        if self.client_ip:
            try:
                value = ipaddress.ip_address(self.client_ip)
            except ValueError:
                value = None
        self.__dict__["_ip"] = (self.client_ip, value)
        return value


@dataclass
class Transaction:
    """One message: envelope, headers, body and the parsed message."""

    mail_from: str = ""  # without angle brackets; "" for the null sender
    mail_params: dict[str, str | None] = field(default_factory=dict)
    rcpts: list[str] = field(default_factory=list)
    queue_id: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)  # (name, raw value)
    body: Any = b""  # bytes, or a file object holding the body (spooled)
    body_size: int = 0
    message: "Message | None" = None  # parsed at end of message
    header_view: "Message | None" = None  # the headers alone, parsed at end of headers
    started: float = field(default_factory=time.monotonic)
    timings: dict[str, float] = field(default_factory=dict)
    # Results that one check leaves for later ones (the SPF, DKIM and DMARC results that
    # list and phishing checks consult), keyed by the name of the check that made them.
    facts: dict[str, Any] = field(default_factory=dict)
    # Recipients that a check found must not get this message, once past RCPT (a block entry
    # of their domain's list matching the From header): recipient -> why.  Unless the whole
    # message is refused, the milter removes them at end of message and delivers to the others.
    drop_rcpts: dict[str, str] = field(default_factory=dict)

    @property
    def rcpt_domains(self) -> list[str]:
        seen: list[str] = []
        for rcpt in self.rcpts:
            domain = rcpt.rpartition("@")[2].lower()
            if domain and domain not in seen:
                seen.append(domain)
        return seen

    @property
    def mail_from_domain(self) -> str:
        return self.mail_from.rpartition("@")[2].lower() if "@" in self.mail_from else ""


MAX_TEXT = 200  # longest matched text a hit keeps


def clip_text(text: str | None) -> str:
    text = text or ""
    return text[:MAX_TEXT] + "..." if len(text) > MAX_TEXT else text


class _LazyText:
    """`text` of a hit, worked out when something reads it.

    A rule's matched text is only shown by `scan --explain` and the JSON
    output; the milter never reads it, so finding it again in the body is
    left until then.  The value may be a string or a function giving one.
    """

    @property
    def text(self) -> str:
        value = self._text
        if callable(value):
            value = self._text = clip_text(value())
        return value


@dataclass
class Hit(_LazyText):
    """A symbol emitted by a rule or check, before scoring."""

    symbol: str
    stage: Stage
    options: list[str] = field(default_factory=list)  # short values shown in headers
    where: str = ""  # what was looked at: "header Subject", "body", "url", ...
    _text: Any = ""  # the exact text that matched, clipped (`text`), or a function giving it
    factor: float = 1.0  # scales the weight, for checks that report a probability
    source: str = ""  # the check or rule file that emitted it


class UndeclaredSymbol(RuntimeError):
    """A check emitted a symbol it did not declare."""


class Hits:
    """The hits of one message (or of one connection's early stages)."""

    MAX_TEXT = MAX_TEXT

    def __init__(self, strict: bool = False) -> None:
        self._hits: dict[str, Hit] = {}
        self.strict = strict
        self._stage = Stage.CONNECT
        self._emitter: str = ""
        self._allowed: frozenset[str] | None = None
        self.undeclared: list[tuple[str, str]] = []

    # The engine sets the context before it calls each check, so that a
    # check only has to name the symbol.
    def _enter(self, stage: Stage, emitter: str, allowed: frozenset[str] | None) -> None:
        self._stage = stage
        self._emitter = emitter
        self._allowed = allowed

    def add(
        self,
        symbol: str,
        *options: Any,
        where: str = "",
        text: Any = "",
        factor: float = 1.0,
    ) -> None:
        """Record SYMBOL. A symbol hit twice keeps its first place and gathers options.

        TEXT is what matched, or a function that finds it when it is read.
        """
        if self._allowed is not None and symbol not in self._allowed:
            self.undeclared.append((self._emitter, symbol))
            if self.strict:
                raise UndeclaredSymbol(f"{self._emitter} emitted undeclared symbol {symbol}")
            return
        opts = [str(o) for o in options if o is not None and o != ""]
        existing = self._hits.get(symbol)
        if existing is not None:
            for opt in opts:
                if opt not in existing.options and len(existing.options) < 10:
                    existing.options.append(opt)
            if factor > existing.factor:
                existing.factor = factor
            return
        if not callable(text):
            text = clip_text(text)
        self._hits[symbol] = Hit(
            symbol=symbol,
            stage=self._stage,
            options=opts[:10],
            where=where,
            _text=text,
            factor=factor,
            source=self._emitter,
        )

    def mark(self) -> int:
        """A point to roll back to (see `rollback`)."""
        return len(self._hits)

    def names_since(self, mark: int) -> list[str]:
        """The symbols first hit since MARK."""
        return list(self._hits)[mark:]

    def rollback(self, mark: int) -> None:
        """Forget the symbols first hit since MARK: a refused recipient's own hits."""
        for symbol in list(self._hits)[mark:]:
            del self._hits[symbol]

    def merge(self, other: "Hits") -> None:
        for symbol, hit in other._hits.items():
            self._hits.setdefault(symbol, hit)

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._hits

    def __iter__(self):
        return iter(self._hits.values())

    def __len__(self) -> int:
        return len(self._hits)

    def get(self, symbol: str) -> Hit | None:
        return self._hits.get(symbol)

    def names(self) -> set[str]:
        return set(self._hits)


class Action(enum.IntEnum):
    """What happens to a message, from mildest to most severe."""

    ACCEPT = 0
    TAG = 1
    REVIEW = 2
    DISCARD = 3
    TEMPFAIL = 4
    REJECT = 5

    @property
    def label(self) -> str:
        return _ACTION_LABELS[self]

    @classmethod
    def parse(cls, text: str) -> "Action":
        try:
            return cls[text.strip().upper().replace("-", "_")]
        except KeyError:
            raise ValueError(
                f"unknown action {text!r} (expected one of: "
                + ", ".join(a.label for a in cls)
                + ")"
            ) from None


_ACTION_LABELS = {action: action.name.lower() for action in Action}


@dataclass
class ScoredHit(_LazyText):
    """A hit with what scoring made of it."""

    symbol: str
    weight: float  # what it added to the score (0 when consumed, testing or capped away)
    base_weight: float  # the declared weight times the hit's factor
    group: str
    description: str
    stage: Stage
    options: list[str]
    where: str
    _text: Any  # see `text`
    source: str  # rule file:line, or the check's module
    emitter: str
    state: str = "stable"
    consumed_by: str = ""
    action: Action | None = None  # fixed action of the symbol


@dataclass
class Thresholds:
    reject: float = 15.0
    review: float = 6.0
    tag: float = 4.0

    def action_for(self, score: float) -> Action:
        if score >= self.reject:
            return Action.REJECT
        if score >= self.review:
            return Action.REVIEW
        if score >= self.tag:
            return Action.TAG
        return Action.ACCEPT


@dataclass
class Verdict:
    """The outcome for one message, as the milter applies it and the CLI prints it."""

    score: float
    action: Action
    thresholds: Thresholds
    hits: list[ScoredHit]
    reason: str = ""  # why the action was chosen: "score", or the forcing symbol
    mode: str = "enforce"  # enforce, tag-only or shadow
    applied: Action = Action.ACCEPT  # what the front end does, once the mode is taken into account
    stage: Stage = Stage.FINAL  # the stage at which the verdict was final
    timings: dict[str, float] = field(default_factory=dict)  # check or rule kind -> seconds
    elapsed: float = 0.0
    errors: list[str] = field(default_factory=list)
    # Set on a verdict taken at RCPT by hits of that recipient's own stage (a block entry of its
    # domain's list): it refuses that recipient alone, and the transaction goes on without it.
    rcpt: str = ""
    # Recipients refused that way during the transaction, with their verdicts (for the CLI).
    refused: list["Verdict"] = field(default_factory=list)

    @property
    def symbols(self) -> list[str]:
        return [h.symbol for h in self.hits]

    def hit(self, symbol: str) -> ScoredHit | None:
        for h in self.hits:
            if h.symbol == symbol:
                return h
        return None
