"""The safe preview of a held message: other people's mail, often hostile.

Its HTML is cleaned by nh3 (the Ammonia sanitiser): no script, no style sheet, no event
handler, no form, and no URL but mailto: and cid:, so that an image or a link to
anywhere is dropped before the browser sees it.  What is left is served as a document
of its own, in a frame with the `sandbox` attribute, under a CSP that allows no load at
all and makes it a sandbox too (app.py, PREVIEW_CSP).  Plain text is escaped.
"""

from __future__ import annotations

import email
import html
from email import policy

import nh3

from milterguard.mail.raw import split_message

MAX_PREVIEW_CHARS = 200_000
TAGS = nh3.ALLOWED_TAGS - {"img", "picture", "source", "video", "audio", "iframe", "object", "embed", "link",
                           "form", "input", "button", "base", "meta", "style", "script", "svg", "math"}


def header_list(raw: bytes) -> list[tuple[str, str]]:
    """The message's headers as (name, value), values decoded for display (RFC 2047)."""
    headers, _body = split_message(raw)
    shown = []
    for name, value in headers:
        try:
            decoded = str(email.header.make_header(email.header.decode_header(value)))
        except (ValueError, LookupError, UnicodeError):
            decoded = value
        shown.append((name, " ".join(decoded.split())))
    return shown


def _body(raw: bytes) -> tuple[str, str]:
    """("html"|"plain", text) of the part a mail reader would show."""
    msg = email.message_from_bytes(raw, policy=policy.default)
    try:
        part = msg.get_body(preferencelist=("html", "plain"))
    except (KeyError, IndexError):
        part = None
    if part is None:
        return "plain", ""
    try:
        text = part.get_content()
    except (LookupError, UnicodeError, ValueError, AssertionError):
        payload = part.get_payload(decode=True) or b""
        text = payload.decode("utf-8", "replace")
    if not isinstance(text, str):
        text = bytes(text).decode("utf-8", "replace")
    return ("html" if part.get_content_subtype() == "html" else "plain"), text[:MAX_PREVIEW_CHARS]


def clean_html(text: str) -> str:
    return nh3.clean(text, tags=TAGS, url_schemes={"mailto", "cid"}, link_rel="noopener noreferrer nofollow",
                     strip_comments=True)


def preview_document(raw: bytes) -> str:
    try:
        kind, text = _body(raw)
    except Exception:  # noqa: BLE001 - a message the email package cannot walk: its body as text
        kind, text = "plain", split_message(raw)[1][:MAX_PREVIEW_CHARS].decode("utf-8", "replace")
    if kind == "html":
        body = clean_html(text)
    else:
        body = f"<pre>{html.escape(text)}</pre>"
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>preview</title>"
            "<style>body{font-family:sans-serif;margin:.5em;color:#222;background:#fff}"
            "pre{white-space:pre-wrap;word-break:break-word}</style></head>"
            f"<body>{body}</body></html>")
