"""Score messages with the same engine, rules and configuration as the milter.

Envelope facts the file does not carry are given with --ip, --helo, --from
and --rcpt; without --ip the message is taken as coming from a local
client, so the client checks do not run.
"""

from __future__ import annotations

import json
import sys
import time

from milterguard.cli.common import CliError, load_engine, report
from milterguard.model import Action, Connection, Transaction
from milterguard.explain import explain_text, verdict_dict
from milterguard.mail.raw import iter_message_files, read_message, split_message


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="+", metavar="FILE|DIR|-", help="message files, directories of them, or - for stdin")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--explain", action="store_true", help="every symbol, where and what it matched, time per check")
    out.add_argument("--json", action="store_true", help="one JSON object per message")
    parser.add_argument("--ip", help="client IP address")
    parser.add_argument("--client-name", default="", help="client host name as the MTA found it (default [IP])")
    parser.add_argument("--helo", default="", help="HELO/EHLO name")
    parser.add_argument("--from", dest="mail_from", default=None, help="envelope sender (MAIL FROM)")
    parser.add_argument("--rcpt", action="append", default=[], help="envelope recipient (repeatable)")
    parser.add_argument("--auth", default="", help="SASL login name, as for an authenticated client")


def build(args, raw: bytes, index: int) -> tuple[Connection, Transaction]:
    """The Connection and Transaction the milter would have built for this message."""
    headers, body = split_message(raw)
    conn = Connection(
        client_ip=args.ip or None,
        client_name=args.client_name or (f"[{args.ip}]" if args.ip else "localhost"),
        helo=args.helo,
        auth_user=args.auth,
        ident=f"scan-{index}",
    )
    mail_from = args.mail_from
    if mail_from is None:
        # A stored message keeps its envelope sender in Return-Path.
        rp = next((v for n, v in headers if n.lower() == "return-path"), "")
        mail_from = rp.strip().strip("<>").strip()
    txn = Transaction(mail_from=mail_from, rcpts=list(args.rcpt), headers=headers, body=body, body_size=len(body))
    return conn, txn


def run(args) -> int:
    try:
        engine = load_engine(args)
    except CliError as exc:
        return report(exc)
    worst = Action.ACCEPT
    status = 0
    index = -1
    for index, path in enumerate(iter_message_files(args.paths)):
        try:
            raw = read_message(path)
        except OSError as exc:
            print(f"milterguard: {path}: {exc.strerror}", file=sys.stderr)
            status = 2
            continue
        conn, txn = build(args, raw, index)
        txn.started = time.monotonic()
        verdict = engine.evaluate(conn, txn)
        worst = max(worst, verdict.action)
        if args.json:
            record = {"file": path}
            record.update(verdict_dict(verdict))
            print(json.dumps(record, ensure_ascii=False))
        elif args.explain:
            print(explain_text(verdict, path))
            print()
        else:
            names = ",".join(h.symbol for h in verdict.hits if h.weight != 0) or "-"
            print(f"{path}\t{verdict.score:.2f}\t{verdict.action.label}\t{names}")
    if index < 0:
        return report(CliError(f"no messages in {', '.join(args.paths)}"))
    return status
