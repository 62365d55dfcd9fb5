"""Forget learned messages: their token counts and the classifier's samples are removed."""

from __future__ import annotations

from milterguard.cli.learn import add_paths, run_learning


def add_arguments(parser) -> None:
    add_paths(parser)


def run(args) -> int:
    return run_learning(args, "")
