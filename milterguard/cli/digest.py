"""`milterguard quarantine digest`: mail each recipient the list of what is held for them,
with signed links to release or delete each message without an account.

A link carries the message id, the recipient, the action and its expiry
(`web.digest_link_days`), signed with the console's key (HMAC-SHA256, kept in the
quarantine's database), and opens a page of the console (`web.url`) that asks to
confirm: a link alone changes nothing, so that a mail scanner that follows links
releases nothing.  The digests go to `quarantine.reinject`, the service that
bypasses the filter.
"""

from __future__ import annotations

import json
import smtplib
import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from sqlalchemy import select

from milterguard.cli.common import CliError
from milterguard.settings import node_name


def pending(store, rcpt: str = "", since: float | None = None) -> dict[str, list[dict]]:
    """Per recipient (lower case): the held messages not released to them, newest first."""
    from milterguard.stores.quarantine import events, messages, recipients

    stmt = (select(recipients.c.address, messages.c.id, messages.c.received_at, messages.c.sender,
                   messages.c.from_header, messages.c.subject, messages.c.score)
            .join(messages, messages.c.id == recipients.c.message_id)
            .where(recipients.c.released_at.is_(None))
            .order_by(recipients.c.address_key, messages.c.received_at.desc()))
    if rcpt:
        stmt = stmt.where(recipients.c.address_key == rcpt.lower())
    if since is not None:
        stmt = stmt.where(messages.c.received_at >= since)
    # A recipient who deleted a message from their digest while others still wait for it
    # dismissed it: it is not listed to them again.
    dismissed = select(events.c.message_id, events.c.detail).where(events.c.kind == "dismiss")
    found: dict[str, list[dict]] = {}

    def work(conn):
        gone = set()
        for message_id, detail in conn.execute(dismissed):
            try:
                gone.add((message_id, json.loads(detail)["rcpt"].lower()))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
        return gone, conn.execute(stmt).mappings().all()

    gone, rows = store._run(work)
    for row in rows:
        if (row["id"], row["address"].lower()) not in gone:
            found.setdefault(row["address"].lower(), []).append(dict(row))
    return found


def _clean(text: str, n: int = 80) -> str:
    text = "".join(c if c.isprintable() else " " for c in text).strip()
    return text if len(text) <= n else text[:n - 1] + "…"


def compose(config, key: bytes, rcpt: str, held: list[dict], sender: str, now: float) -> EmailMessage:
    from milterguard.stores.users import sign_link

    base = config["web.url"].rstrip("/")
    expires = int(now + config["web.digest_link_days"] * 86400)
    lines = [f"{len(held)} message{'s' if len(held) != 1 else ''} for {rcpt} "
             f"{'are' if len(held) != 1 else 'is'} held as possible spam.",
             "Each link opens a page that asks you to confirm; the links work until "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(expires))}.", ""]
    for msg in held:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(msg["received_at"]))
        lines += [f"{when}  from {_clean(msg['from_header'] or msg['sender'] or '<>')}",
                  f"  Subject: {_clean(msg['subject'])}",
                  f"  Release: {base}/d/{sign_link(key, msg['id'], rcpt, 'release', expires)}",
                  f"  Delete:  {base}/d/{sign_link(key, msg['id'], rcpt, 'delete', expires)}", ""]
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = rcpt
    mail["Subject"] = f"Held mail: {len(held)} message{'s' if len(held) != 1 else ''}"
    mail["Date"] = formatdate(now, localtime=False)
    mail["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    mail["Auto-Submitted"] = "auto-generated"
    mail.set_content("\n".join(lines))
    return mail


def send_digests(config, store, rcpt: str = "", since: float | None = None) -> list[tuple[str, int]]:
    """Mail every recipient with held mail their digest; returns (recipient, messages) sent."""
    from milterguard.cli.quarantine import parse_hostport
    from milterguard.stores.users import Users, UsersError

    if not config["web.url"]:
        raise CliError("quarantine digest needs web.url, the console's address for the links")
    sender = config["web.digest_from"]
    if "@" not in sender:
        sender = f"{sender}@{node_name(config)}"
    try:
        key = Users(store.engine).key("digest")
    except UsersError as exc:
        raise CliError(f"quarantine digest: {exc}") from None
    host, port = parse_hostport(config["quarantine.reinject"])
    now = time.time()
    sent = []
    todo = pending(store, rcpt, since)
    if not todo:
        return sent
    try:
        with smtplib.SMTP(host, port, timeout=60) as smtp:
            for address, held in todo.items():
                mail = compose(config, key, address, held, sender, now)
                try:
                    smtp.send_message(mail, from_addr=sender, to_addrs=[address])
                except smtplib.SMTPRecipientsRefused as exc:
                    print(f"milterguard: {address}: refused by {host}:{port}: {exc.recipients}")
                    continue
                sent.append((address, len(held)))
    except (smtplib.SMTPException, OSError) as exc:
        raise CliError(f"quarantine digest: sending to {host}:{port} failed after {len(sent)} digests: {exc}") \
            from None
    return sent
