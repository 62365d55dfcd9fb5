"""What the subcommands share: loading the configuration and the engine."""

from __future__ import annotations

import sys

from milterguard.config import Config, ConfigError, load_config
from milterguard.engine.core import Engine, RulesError
from milterguard.yamlsrc import SourceError


class CliError(Exception):
    """A fault to report on stderr with exit status 2 (or `status`)."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def load(args, extra_sets: list[str] | None = None) -> Config:
    try:
        return load_config(etc_dir=args.etc_dir, config_files=args.config, sets=list(args.sets) + (extra_sets or []))
    except (ConfigError, SourceError) as exc:
        raise CliError(f"configuration error: {exc}") from None


def add_dns_option(parser) -> None:
    parser.add_argument("--dns", action="store_true",
                        help="let the checks look things up in DNS, as --set dns.enabled=true does "
                             "(default: off, as answers today say nothing of stored mail)")


def load_offline(args) -> Config:
    """The configuration with DNS off, unless --dns or --set dns.enabled=... says otherwise.

    Stored mail is judged offline: today's SPF, DKIM and blocklist answers say
    nothing about a message of another year, and a run over many messages
    would send thousands of queries.
    """
    if any(item.split("=", 1)[0].strip() == "dns.enabled" for item in args.sets):
        return load(args)
    return load(args, [f"dns.enabled={'true' if args.dns else 'false'}"])


def load_engine(args, config: Config | None = None, strict: bool = False) -> Engine:
    config = config or load(args)
    try:
        return Engine.load(config, strict=strict)
    except RulesError as exc:
        raise CliError("rule errors:\n  " + "\n  ".join(exc.errors)) from None


def report(exc: CliError) -> int:
    print(f"milterguard: {exc}", file=sys.stderr)
    return exc.status
