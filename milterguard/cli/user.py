"""Manage the web console's users (docs/web.md).

    milterguard user add NAME --role admin|viewer [--replace]
    milterguard user delete NAME
    milterguard user list [--json]

`add` reads the password from the terminal (twice), or the first line of
standard input when it is not a terminal.  Passwords are kept as scrypt
hashes in the quarantine's database (`quarantine.url`), where the console
reads them.  An admin may release, delete, learn and edit the lists; a
viewer sees everything and changes nothing.
"""

from __future__ import annotations

import getpass
import json
import sys
import time

from milterguard.cli.common import CliError, load, report


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=("add", "delete", "list"), help="what to do")
    parser.add_argument("name", nargs="?", metavar="NAME", help="the user (add, delete)")
    parser.add_argument("--role", choices=("admin", "viewer"), default=None, help="add: what the user may do")
    parser.add_argument("--replace", action="store_true", help="add: set a new password and role of a known user")
    parser.add_argument("--json", action="store_true", help="list: one JSON object per line")


def read_password(name: str) -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass(f"password for {name}: ")
    if getpass.getpass("again: ") != first:
        raise CliError("the two passwords differ; nothing changed")
    return first


def run(args) -> int:
    from milterguard.stores.users import Users, UsersError

    try:
        config = load(args)
        if args.action in ("add", "delete") and not args.name:
            raise CliError(f"user {args.action} needs a NAME")
        if args.action == "add" and not args.role:
            raise CliError("user add needs --role admin or --role viewer")
        try:
            users = Users.open(config)
            if args.action == "add":
                users.add(args.name, args.role, read_password(args.name), replace=args.replace)
                users.note("cli", "user-add", args.name, {"role": args.role})
                print(f"user {args.name} ({args.role}) {'updated' if args.replace else 'added'}")
            elif args.action == "delete":
                users.delete(args.name)
                users.note("cli", "user-delete", args.name)
                print(f"user {args.name} deleted")
            else:
                for user in users.list():
                    if args.json:
                        print(json.dumps(user))
                    else:
                        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(user["created_at"]))
                        print(f"{user['name']}\t{user['role']}\t{when}")
        except UsersError as exc:
            raise CliError(f"user {args.action}: {exc}") from None
        return 0
    except CliError as exc:
        return report(exc)
