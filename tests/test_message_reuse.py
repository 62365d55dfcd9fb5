"""The full message built on the header view equals the one parsed from scratch."""

from __future__ import annotations

import io

from milterguard.mail.message import Message

HEADERS = [
    ("From", " =?utf-8?q?J=C3=BCrgen?= <juergen@Example.COM>"),
    ("To", " a@example.org,\r\n\tb@Example.Net"),
    ("Reply-To", " <other@example.net>"),
    ("Subject", " =?bogus-charset?q?hi?="),
    ("Message-ID", " <abc@example.com>"),
    ("X-8bit", " caf\udcc3\udca9"),
    ("MIME-Version", " 1.0"),
    ("Content-Type", ' multipart/alternative; boundary="b"'),
]
BODY = (b"--b\r\nContent-Type: text/plain\r\n\r\nhello http://example.com/x\r\n"
        b"--b\r\nContent-Type: text/html\r\n\r\n<a href=\"http://example.net/\">hi</a>\r\n--b--\r\n")


def _summary(msg: Message) -> tuple:
    return (
        [(h.name, h.raw, h.value) for h in msg.headers], msg.size, sorted(msg.defects), msg.subject,
        msg.from_addr, msg.from_name, msg.from_domain, msg.message_id, msg.addresses("To"),
        msg.addresses("Reply-To"), msg.text, msg.rawbody, [u.url for u in msg.urls],
        [p.content_type for p in msg.parts], msg.truncated,
    )


def test_with_body_equals_from_parts() -> None:
    view = Message.from_parts(HEADERS, b"")
    # Header-derived caches filled at end of headers, and the empty body walked.
    assert view.from_addr == "juergen@example.com" and view.addresses("To")
    assert view.parts and view.text == ""
    assert view.header_count == len(HEADERS)
    full = view.with_body(io.BytesIO(BODY), body_size=len(BODY))
    fresh = Message.from_parts(HEADERS, io.BytesIO(BODY), body_size=len(BODY))
    assert _summary(full) == _summary(fresh)
    assert "MIME_MISSING_VERSION" not in full.defects and "HEADER_8BIT" in full.defects
    assert full.urls and not view.urls  # nothing of the empty body carried over


def test_with_body_limits() -> None:
    view = Message.from_parts(HEADERS, b"", max_scan_bytes=40, max_text_chars=5)
    full = view.with_body(BODY, max_scan_bytes=40, max_text_chars=5)
    fresh = Message.from_parts(HEADERS, BODY, max_scan_bytes=40, max_text_chars=5)
    assert _summary(full) == _summary(fresh)
    assert full.truncated


def test_from_bytes_has_no_header_count() -> None:
    assert Message.from_bytes(b"Subject: x\r\n\r\nbody\r\n").header_count is None
