"""The registry of Python checks.

A check declares the stage it runs at and every symbol it may emit; the
weights and any fixed actions of those symbols live in the rule files.  A
check never scores, never reads thresholds, never decides what happens to
the message and never calls a milter action: it adds hits and facts::

    @check(stage=Stage.HELO, emits=("HELO_BARE_IP", "HELO_NOT_FQDN"))
    def helo_shape(scan, hits: Hits) -> None:
        ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from milterguard.model import Hits, Stage


@dataclass(frozen=True)
class CheckSpec:
    name: str
    stage: Stage
    emits: "Emits"
    fn: Callable
    after: tuple[str, ...] = ()
    priority: int = 50  # lower runs earlier within a stage: cheap checks first
    module: str = ""
    doc: str = ""
    # `active(config)`: whether the check has anything to do under a configuration
    # (DNS on, a clamd named, a blocklist enabled).  An engine leaves out the checks
    # that have not, and their starters, rather than calling them to return at once.
    active: Callable | None = None

    def applies(self, config) -> bool:
        return self.active is None or bool(self.active(config))


CHECKS: dict[str, CheckSpec] = {}
# Starters: functions `fn(scan)` that begin a check's slow work (DNS lookups) at an
# earlier stage than the check itself runs, keyed by stage: (check name, fn).
STARTERS: dict[Stage, list[tuple[str, Callable]]] = {}


class Emits(frozenset):
    """The symbols a check declares.  A name ending in `*` is a family (`RBL_*`):
    the check may emit any symbol of it that a rule file declares, as the DNS
    blocklists do, whose symbols are named in the configuration."""

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(s[:-1] for s in self if s.endswith("*"))

    def __contains__(self, symbol: object) -> bool:
        if frozenset.__contains__(self, symbol):
            return True
        return isinstance(symbol, str) and any(symbol.startswith(p) for p in self.families)

    def concrete(self) -> list[str]:
        return [s for s in self if not s.endswith("*")]


def check(stage: Stage, emits: tuple[str, ...], after: tuple[str, ...] = (), priority: int = 50, name: str | None = None,
          active: Callable | None = None):
    """Register a check function `fn(scan, hits)` for STAGE (see CheckSpec.active for ACTIVE)."""

    def register(fn: Callable) -> Callable:
        check_name = name or fn.__name__
        if check_name in CHECKS and CHECKS[check_name].fn is not fn:
            raise RuntimeError(f"check {check_name} registered twice")
        CHECKS[check_name] = CheckSpec(
            name=check_name, stage=stage, emits=Emits(emits), fn=fn, after=tuple(after),
            priority=priority, module=fn.__module__, doc=(fn.__doc__ or "").strip().split("\n")[0],
            active=active,
        )
        return fn

    return register


_STARTER_PRIORITY: dict[Callable, int] = {}
# Starters that run before their stage's rules, not after them: look-ups of the stage's own
# checks that need nothing the rules find, so that the server works while the rules run.
BEFORE_RULES: set[Callable] = set()


def starter(check_name: str, stage: Stage, priority: int = 50, before_rules: bool = False):
    """Register `fn(scan)` to run at STAGE, before that stage's checks, for the check
    CHECK_NAME of that stage or a later one (when that check is enabled): it starts
    lookups whose answers the check collects.  Lower PRIORITY starts earlier: the
    longest wait first.  BEFORE_RULES runs it before the stage's rules too."""

    def register(fn: Callable) -> Callable:
        entries = STARTERS.setdefault(stage, [])
        if (check_name, fn) not in entries:
            entries.append((check_name, fn))
            _STARTER_PRIORITY[fn] = priority
            entries.sort(key=lambda entry: _STARTER_PRIORITY[entry[1]])  # stable: registration order within a priority
            if before_rules:
                BEFORE_RULES.add(fn)
        return fn

    return register


# Functions `fn(scan, verdict)` told the final verdict of each message (autolearn),
# keyed by the check whose module registers them: they run only when it is enabled.
VERDICT_HOOKS: list[tuple[str, Callable]] = []


def on_verdict(check_name: str):
    """Register `fn(scan, verdict)` to run after a message is scored, while CHECK_NAME
    is enabled.  It may record or learn; it cannot change the verdict."""

    def register(fn: Callable) -> Callable:
        if (check_name, fn) not in VERDICT_HOOKS:
            VERDICT_HOOKS.append((check_name, fn))
        return fn

    return register


PREPARERS: dict[str, Callable] = {}


def preparer(check_name: str):
    """Register `fn(config)` to run when an engine is loaded with the check CHECK_NAME
    enabled: it builds what the check needs from its settings (tables, compiled
    patterns) once, in the supervisor before workers fork, instead of per message."""

    def register(fn: Callable) -> Callable:
        PREPARERS[check_name] = fn
        return fn

    return register


CONFIGURED_SYMBOLS: list[Callable] = []


def configured_symbols(fn: Callable) -> Callable:
    """Register `fn(config) -> {symbol: check name}`: symbols of a family that a check
    will emit because the configuration names them (a blocklist's codes).  Each must be
    declared in a rule file, as a check's own symbols must."""
    if fn not in CONFIGURED_SYMBOLS:
        CONFIGURED_SYMBOLS.append(fn)
    return fn


def ordered(specs: list[CheckSpec]) -> list[CheckSpec]:
    """Checks of one stage in run order: by priority, and after what they name."""
    specs = sorted(specs, key=lambda s: (s.priority, s.name))
    names = {s.name for s in specs}
    done: list[CheckSpec] = []
    placed: set[str] = set()
    pending = list(specs)
    while pending:
        for spec in pending:
            if all(dep in placed or dep not in names for dep in spec.after):
                done.append(spec)
                placed.add(spec.name)
                pending.remove(spec)
                break
        else:
            raise RuntimeError("checks order each other in a loop: " + ", ".join(s.name for s in pending))
    return done


def all_declared() -> dict[str, str]:
    """symbol -> name of the check that declares it."""
    out: dict[str, str] = {}
    for spec in CHECKS.values():
        for symbol in spec.emits.concrete():
            out[symbol] = spec.name
    return out


def declared_families() -> dict[str, str]:
    """symbol prefix (`RBL_`) -> name of the check that declares the family."""
    return {prefix: spec.name for spec in CHECKS.values() for prefix in spec.emits.families}


__all__ = ["CHECKS", "STARTERS", "VERDICT_HOOKS", "on_verdict", "CheckSpec", "Emits", "Hits", "Stage", "check", "starter", "preparer", "ordered", "all_declared",
           "declared_families", "configured_symbols"]
