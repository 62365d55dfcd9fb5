"""Check the configuration and rule files; report every fault with file:line.

Besides the schema, each rule's hit and miss examples are run against its
pattern.  Exit status 1 when anything is wrong, 0 when all is well
(warnings alone do not fail).
"""

from __future__ import annotations

import sys

from milterguard.cli.common import CliError, load, report


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="*", metavar="PATH",
                        help="extra rule files to check along with the configured ones")
    parser.add_argument("--strict", action="store_true", help="treat warnings as errors")


def example_faults(ruleset) -> list[str]:
    """Examples that do not do what they say."""
    faults = []
    for rule in ruleset.rules.values():
        if rule.kind != "match" or rule.redis_map:  # a map in Redis: its entries are not here
            continue
        for example in rule.examples_hit:
            if not rule.example_hits(example):
                faults.append(f"{rule.source}: {rule.symbol}: hit example {example!r} does not hit")
        for example in rule.examples_miss:
            if rule.example_hits(example):
                faults.append(f"{rule.source}: {rule.symbol}: miss example {example!r} hits")
    return faults


def run(args) -> int:
    try:
        config = load(args)
    except CliError as exc:
        return report(exc)
    from milterguard.engine.core import load_ruleset

    if args.paths:
        import os

        extra = []
        for path in args.paths:
            if os.path.isdir(path):
                extra += sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith((".yaml", ".yml")))
            elif not os.path.exists(path):
                print(f"milterguard: {path}: no such file", file=sys.stderr)
                return 2
            else:
                extra.append(path)
        config = config.with_sets([])
        config.values["rules.files"] = list(config.values["rules.files"]) + extra
    ruleset = load_ruleset(config)
    errors = list(ruleset.errors) + example_faults(ruleset)
    for line in errors:
        print(f"error: {line}")
    for line in ruleset.warnings:
        print(f"warning: {line}")
    counted = sum(1 for r in ruleset.rules.values())
    print(f"{len(ruleset.files)} rule files, {counted} symbols, {len(errors)} errors, {len(ruleset.warnings)} warnings",
          file=sys.stderr)
    if errors or (args.strict and ruleset.warnings):
        return 1
    return 0
