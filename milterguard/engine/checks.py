"""The registry of Python checks.

A check declares the stage it runs at and every symbol it may emit; the
weights of those symbols live in the rule files.  A check never scores,
never reads thresholds and never calls a milter action::

    @check(stage=Stage.HELO, emits=("HELO_BARE_IP", "HELO_NOT_FQDN"))
    def helo_shape(scan: Scan, hits: Hits) -> None:
        ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from milterguard.engine.model import Hits, Stage


@dataclass(frozen=True)
class CheckSpec:
    name: str
    stage: Stage
    emits: frozenset[str]
    fn: Callable
    after: tuple[str, ...] = ()
    priority: int = 50  # lower runs earlier within a stage: cheap checks first
    module: str = ""
    doc: str = ""


CHECKS: dict[str, CheckSpec] = {}


def check(stage: Stage, emits: tuple[str, ...], after: tuple[str, ...] = (), priority: int = 50, name: str | None = None):
    """Register a check function `fn(scan, hits)` for STAGE."""

    def register(fn: Callable) -> Callable:
        check_name = name or fn.__name__
        if check_name in CHECKS and CHECKS[check_name].fn is not fn:
            raise RuntimeError(f"check {check_name} registered twice")
        CHECKS[check_name] = CheckSpec(
            name=check_name, stage=stage, emits=frozenset(emits), fn=fn, after=tuple(after),
            priority=priority, module=fn.__module__, doc=(fn.__doc__ or "").strip().split("\n")[0],
        )
        return fn

    return register


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
        for symbol in spec.emits:
            out[symbol] = spec.name
    return out


__all__ = ["CHECKS", "CheckSpec", "Hits", "Stage", "check", "ordered", "all_declared"]
