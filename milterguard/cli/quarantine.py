"""Work the quarantine: messages held for review (quarantine.mode store).

    milterguard quarantine list [--rcpt ADDR] [--from ADDR] [--since 2d] [--symbol NAME] [--min-score N] [--limit N]
    milterguard quarantine show ID [--raw | --explain]
    milterguard quarantine release ID [--rcpt ADDR]... [--force] [--learn-ham]
    milterguard quarantine delete ID [--learn-spam]
    milterguard quarantine learn ID --learn-ham|--learn-spam
    milterguard quarantine expire
    milterguard quarantine stats
    milterguard quarantine digest [--rcpt ADDR] [--since AGE]

Every subcommand takes --json (list: one object per line per message).
Release sends the stored bytes with the original envelope to quarantine.reinject,
with an X-Milterguard-Released header; see docs/quarantine.md.
--learn-ham and --learn-spam teach Bayes, the classifier's samples and the
hash store what the message was, as `learn` and `fuzzy` do.
Digest mails each recipient the list of their held mail, with signed links
to the console (web.url) to release or delete each; see docs/web.md.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import smtplib
import sys
import time
from email.utils import formatdate

from milterguard.cli.common import CliError, load, report

ACTIONS = ("list", "show", "release", "delete", "learn", "expire", "stats", "digest")
# Which of --learn-ham and --learn-spam each action takes.
LEARNING = {"release": ("ham",), "delete": ("spam",), "learn": ("ham", "spam")}
RELEASED_HEADER = "X-Milterguard-Released"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 86400, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=ACTIONS, help="what to do")
    parser.add_argument("ident", nargs="?", metavar="ID", help="the message (show, release, delete, learn)")
    parser.add_argument("--json", action="store_true", help="print JSON (list: one object per line)")
    parser.add_argument("--rcpt", action="append", default=[], metavar="ADDR",
                        help="list, digest: messages to ADDR; release: to ADDR only (repeatable; default all recipients)")
    parser.add_argument("--from", dest="sender", default="", metavar="ADDR",
                        help="list: messages from ADDR (envelope sender or From header)")
    parser.add_argument("--since", default="", metavar="AGE", help="list, digest: stored within AGE (30m, 12h, 2d, 1w)")
    parser.add_argument("--symbol", default="", metavar="NAME", help="list: messages with this symbol")
    parser.add_argument("--min-score", type=float, default=None, metavar="N", help="list: score at least N")
    parser.add_argument("--limit", type=int, default=100, metavar="N", help="list: at most N messages, newest first")
    parser.add_argument("--raw", action="store_true", help="show: the stored message as bytes")
    parser.add_argument("--explain", action="store_true", help="show: the stored verdict, symbol by symbol")
    parser.add_argument("--force", action="store_true", help="release: again to recipients released before")
    parser.add_argument("--by", default="", metavar="NAME",
                        help="release, delete, learn: who does it, for the record (default: the login name)")
    label = parser.add_mutually_exclusive_group()
    label.add_argument("--learn-ham", dest="learn", action="store_const", const="ham", default="",
                       help="release, learn: learn the message as ham (Bayes, samples) and take its hashes "
                            "out of the fuzzy store; needs Redis")
    label.add_argument("--learn-spam", dest="learn", action="store_const", const="spam",
                       help="delete, learn: learn the message as spam and add its hashes to the fuzzy store; "
                            "needs Redis")


def parse_age(text: str) -> float:
    """Seconds in an age like 30m, 12h, 2d or 1w (a bare number is days)."""
    match = _DURATION.match(text)
    if not match:
        raise CliError(f"--since {text!r}: expected an age like 30m, 12h, 2d or 1w")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise CliError(f"quarantine.reinject {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def _who(args) -> str:
    if args.by:
        return args.by
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):  # no name for this uid
        return f"uid {os.getuid()}"


def run(args) -> int:
    try:
        config = load(args)
        if args.action in ("show", "release", "delete", "learn") and not args.ident:
            raise CliError(f"quarantine {args.action} needs the message's ID")
        if args.learn and args.learn not in LEARNING.get(args.action, ()):
            raise CliError(f"quarantine {args.action} does not take --learn-{args.learn}")
        if args.action == "learn" and not args.learn:
            raise CliError("quarantine learn needs --learn-ham or --learn-spam")
        from milterguard.stores.quarantine import AlreadyReleased, QuarantineError, open_quarantine

        try:
            store = open_quarantine(config)
            try:
                return globals()[f"_{args.action}"](args, config, store)
            finally:
                store.close()
        except AlreadyReleased as exc:
            raise CliError(str(exc), status=1) from None
        except QuarantineError as exc:
            raise CliError(f"quarantine: {exc}") from None
    except CliError as exc:
        return report(exc)


def _print_json(obj) -> None:
    print(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))


def _list(args, config, store) -> int:
    from milterguard.stores.quarantine import Query

    if len(args.rcpt) > 1:
        raise CliError("quarantine list takes one --rcpt")
    query = Query(rcpt=args.rcpt[0] if args.rcpt else "", sender=args.sender, symbol=args.symbol,
                  min_score=args.min_score, limit=args.limit,
                  since=time.time() - parse_age(args.since) if args.since else None)
    for held in store.list(query):
        if args.json:
            _print_json(held.as_dict())
            continue
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(held.received_at))
        names = ",".join(s["name"] for s in held.symbols[:4])
        print(f"{held.id}  {when}  {held.score:6.2f}  {held.sender or '<>'} -> {','.join(held.rcpts)}  "
              f"{held.subject[:60]!r}  {names}")
    return 0


def _show(args, config, store) -> int:
    held = store.get(args.ident)
    if args.raw:
        sys.stdout.buffer.write(store.raw(args.ident))
        sys.stdout.flush()
        return 0
    if args.json:
        record = held.as_dict()
        record["explain"] = held.explain
        record["events"] = store.events(args.ident)
        _print_json(record)
        return 0
    if args.explain:
        print(held.explain)
        return 0
    record = held.as_dict()
    for key in ("id", "date", "node", "queue_id", "client", "client_name", "helo", "from", "rcpts",
                "header_from", "subject", "score", "action", "size"):
        value = record[key]
        print(f"{key + ':':<13}{', '.join(value) if isinstance(value, list) else value}")
    for rcpt, (at, who) in held.released.items():
        print(f"{'released:':<13}{rcpt} by {who} at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(at))}")
    print("symbols:     " + ", ".join(f"{s['name']}({s['weight']:.2f})" for s in held.symbols))
    return 0


def reinject(config, who: str):
    """The send step of a release: the stored bytes, a header saying who released them and
    when, and the original envelope, to quarantine.reinject; returns the refused recipients."""
    host, port = parse_hostport(config["quarantine.reinject"])

    def send(held, raw: bytes, rcpts: list[str]) -> list[str]:
        header = f"{RELEASED_HEADER}: by {who} at {formatdate(localtime=True)} (quarantine id {held.id})\r\n"
        data = header.encode("utf-8") + raw
        try:
            with smtplib.SMTP(host, port, timeout=60) as smtp:
                smtp.ehlo()
                options = []
                if (held.mail_params.get("BODY", "").upper() == "8BITMIME" or not data.isascii()) \
                        and smtp.has_extn("8bitmime"):
                    options.append("BODY=8BITMIME")
                if not all(a.isascii() for a in (held.sender, *rcpts)) and smtp.has_extn("smtputf8"):
                    options.append("SMTPUTF8")
                refused = smtp.sendmail(held.sender, rcpts, data, mail_options=options)
        except smtplib.SMTPRecipientsRefused as exc:
            raise CliError(f"{host}:{port} refused every recipient: {_refusals(exc.recipients)}") from None
        except (smtplib.SMTPException, OSError) as exc:
            raise CliError(f"re-injection to {host}:{port} failed: {exc}") from None
        if refused:
            print(f"{host}:{port} refused {_refusals(refused)}", file=sys.stderr)
        return list(refused)

    return send


def _refusals(refused: dict) -> str:
    return "; ".join(f"{rcpt} ({code} {text.decode('utf-8', 'replace') if isinstance(text, bytes) else text})"
                     for rcpt, (code, text) in refused.items())


def _release(args, config, store) -> int:
    who = _who(args)
    teacher = _teacher(args, config)  # before anything is sent: a Redis not configured is refused here
    done = store.release(args.ident, reinject(config, who), rcpts=args.rcpt, who=who, force=args.force)
    record = {"id": args.ident, "released": done, "by": who}
    status = 0 if done else 1
    if teacher and done:
        # Released first: the mail must not wait for Redis.  A learning that fails
        # afterwards says so and can be done again with `quarantine learn`.
        from milterguard.clients.redis_client import RedisUnavailable

        try:
            record["learned"] = _teach(args, config, store, teacher, who)
        except RedisUnavailable as exc:
            record["learned"] = None
            status = report(CliError(f"{args.ident} released but not learned as {args.learn}: Redis not reachable: "
                                     f"{exc}; run `milterguard quarantine learn {args.ident} --learn-{args.learn}` "
                                     f"when it is back", status=75))
    if args.json:
        _print_json(record)
    else:
        if done:
            print(f"{args.ident} released to {', '.join(done)}")
        if record.get("learned"):
            _print_learned(record["learned"])
    return status


def _delete(args, config, store) -> int:
    who = _who(args)
    record: dict = {"id": args.ident, "deleted": True}
    teacher = _teacher(args, config)
    if teacher:
        # Learned first: once deleted, the message could not be learned again.
        from milterguard.clients.redis_client import RedisUnavailable

        try:
            record["learned"] = _teach(args, config, store, teacher, who)
        except RedisUnavailable as exc:
            raise CliError(f"{args.ident} not deleted: learning it as spam failed: Redis not reachable: {exc}; "
                           f"try again when it is back, or delete it without --learn-spam", status=75) from None
    store.delete(args.ident, who=who)
    if args.json:
        _print_json(record)
    else:
        if teacher:
            _print_learned(record["learned"])
        print(f"{args.ident} deleted")
    return 0


def _learn(args, config, store) -> int:
    """`quarantine learn ID`: learning alone, such as after a release whose learning failed."""
    from milterguard.clients.redis_client import RedisUnavailable

    try:
        learned = _teach(args, config, store, _teacher(args, config), _who(args))
    except RedisUnavailable as exc:
        raise CliError(f"{args.ident} not learned as {args.learn}: Redis not reachable: {exc}", status=75) from None
    if args.json:
        _print_json({"id": args.ident, "learned": learned})
    else:
        _print_learned(learned)
    return 0


def _teach(args, config, store, teacher, who: str) -> dict:
    return teach(config, store, args.ident, args.learn, teacher, who)


def teach(config, store, ident: str, label: str, teacher, who: str) -> dict:
    """Learn the stored message IDENT as LABEL (ham, spam): Bayes and the classifier's samples, as
    `learn` does, and its hashes added to the fuzzy store (spam, as `fuzzy add`) or taken out of
    it (ham, as `fuzzy del`).  The console learns through here too.  Raises RedisUnavailable."""
    from milterguard.cli.fuzzy import apply
    from milterguard.cli.learn import learn_messages, summary
    from milterguard.stores.quarantine import as_received

    bayes, fuzzy = teacher
    raw = as_received(store.get(ident), store.raw(ident))
    counts = learn_messages(bayes, config, [(ident, raw)], label)
    bayes_line = summary(bayes, config, label, counts)
    hashes, _status = apply(fuzzy, config, "add" if label == "spam" else "del", raw)
    outcome = next((name for name, count in counts.items() if count), "known")
    store.note(ident, "learn", who, json.dumps({"as": label, "bayes": outcome}))
    return {"id": ident, "as": label, "bayes": outcome, "summary": bayes_line,
            "hashes": hashes.replace("\t", " ")}


def _print_learned(learned: dict) -> None:
    print(f"{learned['id']} learned as {learned['as']}: {learned['summary']}")
    print(f"{learned['id']} hashes: {learned['hashes']}")


def _teacher(args, config):
    """(Bayes, fuzzy store) when --learn-ham or --learn-spam asks to learn; CliError when Redis
    is not configured or this node may not write to it (nothing is released or deleted then)."""
    if not args.learn:
        return None
    return open_teacher(config, args.learn)


def open_teacher(config, label: str):
    """(Bayes, fuzzy store) for learning as LABEL; CliError when Redis is not configured or this
    node may not write to it."""
    from milterguard.cli.fuzzy import open_fuzzy
    from milterguard.cli.learn import open_bayes

    try:
        return open_bayes(config), open_fuzzy(config)
    except CliError as exc:
        raise CliError(f"--learn-{label}: {exc}; nothing was done") from None


def _expire(args, config, store) -> int:
    from milterguard.stores.history import History, HistoryError

    days, cap = config["quarantine.retention_days"], config["quarantine.max_size"]
    count, size = store.expire(days, cap)
    try:
        history = History(store.engine).expire(config["history.retention_days"])
    except HistoryError as exc:
        raise CliError(f"history: {exc}") from None
    if args.json:
        _print_json({"removed": count, "bytes": size, "retention_days": days, "max_size": cap,
                     "history_removed": history, "history_retention_days": config["history.retention_days"]})
    else:
        print(f"removed {count} messages ({size} bytes): older than {days} days"
              + (f" or past the {cap} byte cap" if cap else ""))
        print(f"removed {history} history rows: older than {config['history.retention_days']} days")
    return 0


def _stats(args, config, store) -> int:
    stats = store.stats()
    if args.json:
        _print_json(stats)
        return 0
    for key, value in stats.items():
        if key in ("oldest", "newest") and value:
            value = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items()) or "-"
        print(f"{key + ':':<16}{value}")
    return 0


def _digest(args, config, store) -> int:
    from milterguard.cli.digest import send_digests

    if len(args.rcpt) > 1:
        raise CliError("quarantine digest takes one --rcpt")
    sent = send_digests(config, store, args.rcpt[0] if args.rcpt else "",
                        time.time() - parse_age(args.since) if args.since else None)
    for address, count in sent:
        if args.json:
            _print_json({"rcpt": address, "messages": count})
        else:
            print(f"digest of {count} message{'s' if count != 1 else ''} sent to {address}")
    if not sent and not args.json:
        print("nothing held: no digest sent")
    return 0
