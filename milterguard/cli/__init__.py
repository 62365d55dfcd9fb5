"""The `milterguard` command: one module per subcommand.

Each module has `add_arguments(parser)` and `run(args) -> int`; this table
is the whole dispatch.  Only the module of the command given is imported
(`--help` and `--version` import none), so that a command pays only for the
libraries it uses.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from milterguard import __version__

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("milterguard.cli.serve", "run the milter daemon"),
    "scan": ("milterguard.cli.scan", "score messages with the same engine as the milter"),
    "lint": ("milterguard.cli.lint", "check rule files and configuration"),
    "corpus": ("milterguard.cli.corpus", "hit rates of each rule on a spam and a ham corpus"),
    "config": ("milterguard.cli.config", "show the effective configuration"),
    "bench": ("milterguard.cli.bench", "measure the engine's speed on a set of messages"),
    "learn": ("milterguard.cli.learn", "learn messages as spam or ham (Bayes and classifier samples in Redis)"),
    "unlearn": ("milterguard.cli.unlearn", "forget learned messages"),
    "bayes": ("milterguard.cli.bayes", "Bayes database statistics and token expiry"),
    "train": ("milterguard.cli.train", "train the classifier on the learned messages and publish it"),
    "evaluate": ("milterguard.cli.evaluate", "accuracy on a spam and a ham corpus: learn, train and test on a fixed split"),
    "list": ("milterguard.cli.list", "show and edit the allow and block lists"),
    "map": ("milterguard.cli.map", "show and edit the maps of rules kept in Redis"),
    "fuzzy": ("milterguard.cli.fuzzy", "report spam by its content hashes, forget it, or check files"),
    "quarantine": ("milterguard.cli.quarantine", "list, show, release, delete and expire quarantined messages"),
    "user": ("milterguard.cli.user", "add, delete and list the web console's users"),
    # The console is the face above this one (it releases and learns through cli/quarantine.py):
    # its command lives in its package, named here by module as every command is.
    "web": ("milterguard.web.command", "run the web console"),
}


def add_common(parser: argparse.ArgumentParser) -> None:
    """Options every subcommand takes."""
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="an extra configuration file, merged over /etc (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                        help="set one setting, e.g. --set thresholds.reject=12 (repeatable)")
    parser.add_argument("--etc-dir", metavar="DIR", default=None,
                        help="configuration directory (default /etc/milterguard, or $MILTERGUARD_ETC_DIR)")


def build_parser(command: str | None = None) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser | None]:
    """The top-level parser, and the parser of COMMAND (None without one).

    Every command is listed with its help line; only COMMAND's module is imported.
    """
    parser = argparse.ArgumentParser(prog="milterguard", description="Anti-spam and anti-phishing milter.")
    parser.add_argument("--version", action="version", version=f"milterguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = None
    for name, (module, help_text) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text)
            continue
        mod = import_module(module)
        chosen = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip().split("\n")[0])
        mod.add_arguments(chosen)
        add_common(chosen)
        chosen.set_defaults(_module=mod, command=name)
    return parser, chosen


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    # Not list(argv): importing the `list` command binds that name in this package (`map` too).
    argv = sys.argv[1:] if argv is None else [*argv]
    # The top level has only options without values, so the first word is the command.
    at = next((i for i, word in enumerate(argv) if not word.startswith("-")), len(argv))
    parser, command = build_parser(argv[at] if at < len(argv) else None)
    if command is None:
        parser.parse_args(argv)  # --help, --version, or a usage error
        parser.print_help(sys.stderr)
        return 2
    parser.parse_args(argv[:at])
    # The command's own parser takes its options and arguments in any order
    # (`list add allow --domain example.net friend.example`); argparse's dispatch
    # to a subcommand would leave the words after an option over, as an error.
    args = command.parse_intermixed_args(argv[at + 1:])
    try:
        return args._module.run(args)
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        # A file named on the command line that cannot be read: one line, not a traceback.
        print(f"milterguard: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 2


def console_main() -> None:
    sys.exit(main())
