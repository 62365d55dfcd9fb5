"""Show and edit the allow and block lists (files under lists.dir).

    milterguard list add block 192.0.2.0/24 spammer@example.net
    milterguard list add allow partner.example --domain example.org
    milterguard list del block 192.0.2.0/24
    milterguard list show [allow|block] [--domain example.org]

A running filter picks the change up within lists.check_interval seconds,
without a reload.
"""

from __future__ import annotations

from pathlib import Path

from milterguard.cli.common import CliError, load, report
from milterguard.stores.lists import GLOBAL, KINDS, add_entries, list_path, read_entries, remove_entries
from milterguard.yamlsrc import SourceError


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=("add", "del", "show"), help="add or delete entries, or show the lists")
    parser.add_argument("kind", nargs="?", choices=KINDS, help="allow or block (show: both when omitted)")
    parser.add_argument("entries", nargs="*", metavar="ENTRY",
                        help="email address, domain (with its subdomains), IP address or CIDR")
    parser.add_argument("--domain", default=GLOBAL, help="the lists of this recipient domain (default: the global ones)")


def run(args) -> int:
    try:
        config = load(args)
        if not config["lists.dir"]:
            raise CliError("lists.dir is empty: lists are off")
        base = Path(config.expand(config["lists.dir"]))
        domain = args.domain.lower().strip(".")
        if args.action == "show":
            return _show(base, domain, args.kind)
        if not args.kind or not args.entries:
            raise CliError(f"list {args.action} needs a kind (allow or block) and at least one entry")
        path = list_path(base, args.kind, domain)
        if args.action == "add":
            try:
                done = add_entries(path, args.entries)
            except SourceError as exc:
                raise CliError(str(exc)) from None
            verb = "added to"
        else:
            done = remove_entries(path, args.entries)
            verb = "removed from"
            missing = set(e.lower() for e in args.entries) - set(e.lower() for e in done)
            if missing:
                print(f"not in {path}: {', '.join(sorted(missing))}")
        for entry in done:
            print(f"{entry} {verb} {path}")
        return 0 if done or args.action == "add" else 1
    except CliError as exc:
        return report(exc)


def _show(base: Path, domain: str, kind: str | None) -> int:
    domains = [domain] if domain else [GLOBAL] + sorted(p.name for p in base.glob("*") if p.is_dir())
    for dom in domains:
        for k in ([kind] if kind else KINDS):
            path = list_path(base, k, dom)
            entries = read_entries(path)
            if entries or domain or kind:
                print(f"# {k} {'(global)' if not dom else dom}: {path}")
                for entry in entries:
                    print(entry)
    return 0
