"""The shared vocabulary: stages, actions, connection and transaction
state, the facts checks leave for each other, hits and verdicts.

A `Connection` lives for one SMTP connection; a `Transaction` is created
at each MAIL FROM and dropped at end of message or abort.  Front ends (the
milter adapter, the CLI) only fill these objects with what the MTA said;
the engine and the checks read them.  This module imports no other module
of the package, and every other may import it.
"""

from __future__ import annotations

import enum
import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any


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
    # What the checks of the connect and HELO stages found (the DNS session of the client's lookups).
    facts: "Facts" = field(default_factory=lambda: Facts())

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
    message: Any = None  # the parsed mail.message.Message, at end of message
    header_view: Any = None  # a Message of the headers alone, parsed at end of headers
    started: float = field(default_factory=time.monotonic)
    timings: dict[str, float] = field(default_factory=dict)
    # What the checks found that other parts read: see `Facts`.
    facts: "Facts" = field(default_factory=lambda: Facts())

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


# ---------------------------------------------------------------- facts
# What one check finds and another part reads.  Each is written by one check
# (named in its docstring) and read by the others named there; a fact that is
# None was not looked for (the check is off, or had nothing to judge).


@dataclass
class SpfResult:
    """SPF (checks/spf.py); read by DMARC, the lists and Authentication-Results."""

    result: str  # pass, fail, softfail, neutral, none, permerror, temperror
    domain: str  # the domain whose policy was evaluated
    identity: str  # "mailfrom" or "helo"
    sender: str
    ip: str
    explanation: str = ""
    via_relay: bool = False


@dataclass
class DkimSignature:
    domain: str
    selector: str
    result: str  # pass, fail, permerror, temperror
    reason: str = ""


@dataclass
class DkimResult:
    """DKIM (checks/dkim.py); read by DMARC, the lists and Authentication-Results."""

    result: str  # pass (one signature verifies), fail, permerror, temperror, none
    signatures: list[DkimSignature] = field(default_factory=list)

    @property
    def passing_domains(self) -> list[str]:
        return [s.domain for s in self.signatures if s.result == "pass"]


@dataclass
class ArcResult:
    """ARC (checks/arc.py); read by DMARC and Authentication-Results."""

    result: str  # pass, fail, none, temperror
    sealer: str = ""  # d= of the latest ARC-Seal
    instances: int = 0
    trusted: bool = False
    reason: str = ""
    results: list[str] = field(default_factory=list)  # ARC-Authentication-Results values, oldest first


@dataclass
class DmarcResult:
    """DMARC (checks/dmarc.py); read by the lists and Authentication-Results.

    `result` is pass, fail, none, temperror or permerror; `domain` the
    RFC5322.From domain; `policy` the policy that applies to it (reject,
    quarantine, none; "" without a record); `override` names what spared a
    failing message its policy ("arc:<sealer>").
    """

    result: str
    domain: str
    policy: str = ""
    record_domain: str = ""  # where the record was found
    spf_aligned: bool = False
    dkim_aligned: bool = False
    applied: str = ""  # the policy after pct/t=: reject, quarantine or none
    sample: int = -1  # 0-99, the message's place for pct (pct_sample); -1 when not needed
    reason: str = ""
    override: str = ""


@dataclass
class AuthResults:
    """The Authentication-Results header of this message (checks/auth_results.py, RFC 8601),
    and the headers that arrived claiming our authserv-id; scoring decides the edits."""

    authserv_id: str
    methods: list[str] = field(default_factory=list)
    forged: list[int] = field(default_factory=list)  # 1-based indexes among Authentication-Results

    def header(self) -> str:
        if not self.methods:
            return f"{self.authserv_id}; none"
        return f"{self.authserv_id};\n\t" + ";\n\t".join(self.methods)


@dataclass
class Learned:
    """What a learned classifier said (checks/learning.py); read by `evaluate`."""

    probability: float
    detail: dict[str, Any] = field(default_factory=dict)  # tokens used and counts, or the model version


@dataclass
class Facts:
    """What checks found that other parts read: the contract between them, in one place."""

    dns: Any = None  # clients.dns_client.Session: the look-ups and DNS budget of this message
    spf: SpfResult | None = None
    dkim: DkimResult | None = None
    arc: ArcResult | None = None
    dmarc: DmarcResult | None = None
    auth_results: AuthResults | None = None
    # What the tokens are made of (learn.tokens.Pieces), made once for Bayes, the classifier and the shipped model
    token_pieces: Any = None
    tokens: list[str] | None = None  # learn.tokens of the message, made once for Bayes and the classifier
    token_hashes: Any = None  # their hashes (learn.linear.token_hash_array: a numpy uint64 array)
    bayes: Learned | None = None
    classifier: Learned | None = None
    default_classifier: Learned | None = None  # the shipped model (checks/shipped_model.py), read by evaluate
    # Recipients whose own domain's block list refuses this message once past RCPT (checks/lists.py):
    # recipient -> why.  Scoring turns them into Verdict.drop_rcpts.
    blocked_rcpts: dict[str, str] = field(default_factory=dict)
    # A check's own state between its starter and itself, keyed by the check's name; nothing else reads it.
    scratch: dict[str, Any] = field(default_factory=dict)


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
class HeaderEdits:
    """Header changes for the front end to make, in this order: remove, prepend, add, Subject."""

    remove: list[tuple[str, int]] = field(default_factory=list)  # (name, 1-based index), highest first
    prepend: list[tuple[str, str]] = field(default_factory=list)  # go on top of the message (RFC 8601 5)
    add: list[tuple[str, str]] = field(default_factory=list)
    subject: str | None = None  # the new Subject (tagging), or None to leave it


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
    # What the front end does to the message besides the action (scoring.finalize decides):
    drop_rcpts: dict[str, str] = field(default_factory=dict)  # recipients removed at end of message -> why
    edits: "HeaderEdits | None" = None
    learn: str = ""  # "spam" or "ham": autolearn takes the message as that (scoring.autolearn_label)
    quarantine: str = ""  # for review: "store" (our quarantine) or "mta-hold" (the MTA's hold queue)
    logged: bool = False  # the front end has logged this verdict

    @property
    def symbols(self) -> list[str]:
        return [h.symbol for h in self.hits]

    def hit(self, symbol: str) -> ScoredHit | None:
        for h in self.hits:
            if h.symbol == symbol:
                return h
        return None
