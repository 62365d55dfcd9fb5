"""Show the effective configuration, its reference, or the shipped defaults."""

from __future__ import annotations

from milterguard import config as cfgmod
from milterguard.cli.common import CliError, load, report


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=("dump", "doc", "defaults"),
                        help="dump: effective values; doc: the reference page; defaults: conf/milterguard.yaml")
    parser.add_argument("--origin", action="store_true", help="with dump: the file and line that set each value")


def run(args) -> int:
    if args.action == "doc":
        print(cfgmod.reference_markdown(), end="")
        return 0
    if args.action == "defaults":
        print(cfgmod.default_yaml(), end="")
        return 0
    try:
        config = load(args)
    except CliError as exc:
        return report(exc)
    print(cfgmod.dump(config, origin=args.origin), end="")
    return 0
