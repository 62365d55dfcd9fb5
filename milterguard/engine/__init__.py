"""The engine: takes a Transaction, returns a Verdict."""

from milterguard.model import (
    Action,
    Connection,
    Hit,
    Hits,
    ScoredHit,
    Stage,
    Thresholds,
    Transaction,
    Verdict,
)

__all__ = [
    "Action", "Connection", "Hit", "Hits", "ScoredHit", "Stage", "Thresholds", "Transaction", "Verdict",
]
