"""Tests for milterguard.mail.message (with htmltext and urls).

The corpus test at the end parses every message of the shared
SpamAssassin corpus: 2002 mail with plenty of broken MIME and 8-bit
headers, which is the best robustness check we have.
"""

from __future__ import annotations

import base64
import io
import pathlib
import tempfile

import pytest

from milterguard.mail.htmltext import extract_links, html_to_text
from milterguard.mail.message import DEFECTS, MAX_DEPTH, MAX_PARTS, Header, Message, Part
from milterguard.mail.urls import Url, find_text_urls, make_url, normalize_host, strip_trailing

CORPUS = pathlib.Path("/work/shared/corpus/spamassassin")


def msg(text: str | bytes, **kwargs) -> Message:
    """Build a Message from a test literal (str is encoded as UTF-8)."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return Message.from_bytes(raw, **kwargs)


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


SIMPLE = """\
From: "Alice Example" <alice@Example.COM>
To: bob@example.org, "Carol, C." <carol@EXAMPLE.net>
Subject: hello there
Message-ID: <abc.123@example.com>
Received: from a.example (a.example [192.0.2.1])
\tby mx.example with ESMTP id X1
\tfor <bob@example.org>; Mon, 1 Jan 2024 00:00:00 +0000
Date: Mon, 1 Jan 2024 00:00:00 +0000

Hi Bob,
see http://www.example.com/page.html.
"""

MULTI_ALT = """\
From: a@example.com
Subject: alt
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="XX"

preamble text
--XX
Content-Type: text/plain; charset=utf-8

plain version http://plain.example/
--XX
Content-Type: text/html; charset=utf-8

<html><body><p>html version <a href="http://html.example/">click</a></p></body></html>
--XX--
epilogue
"""


# -- headers --------------------------------------------------------------


class TestHeaders:
    def test_basic_accessors(self):
        m = msg(SIMPLE)
        assert m.subject == "hello there"
        assert m.header("subject") == "hello there"
        assert m.header("X-Missing") is None
        assert m.has_header("MESSAGE-ID")
        assert not m.has_header("X-Missing")
        assert m.message_id == "abc.123@example.com"
        assert [h.name for h in m.headers][:3] == ["From", "To", "Subject"]
        assert all(isinstance(h, Header) for h in m.headers)

    def test_unfolding(self):
        m = msg(SIMPLE)
        (received,) = m.header_raw("received")
        assert "\n" not in received and "\t" not in received
        assert received == (
            "from a.example (a.example [192.0.2.1]) by mx.example with ESMTP id X1 "
            "for <bob@example.org>; Mon, 1 Jan 2024 00:00:00 +0000"
        )

    def test_header_values_and_raw_in_order(self):
        m = msg("X-A: one\nX-B: two\nx-a: three\n\nbody\n")
        assert m.header_values("X-A") == ["one", "three"]
        assert m.header_raw("x-a") == ["one", "three"]

    def test_header_block(self):
        m = msg("From: a@b.example\nSubject:  x\n\nbody\n")
        assert m.header_block() == "From: a@b.example\nSubject: x\n"

    def test_addresses(self):
        m = msg(SIMPLE)
        assert m.addresses("To") == [("", "bob@example.org"), ("Carol, C.", "carol@example.net")]
        assert m.from_addr == "alice@example.com"
        assert m.from_name == "Alice Example"
        assert m.from_domain == "example.com"

    def test_addresses_encoded_display_name(self):
        m = msg("From: =?utf-8?B?SsO8cmdlbg==?= <JUERGEN@Example.DE>\n\nx\n")
        assert m.addresses("from") == [("Jürgen", "JUERGEN@example.de")]
        assert m.from_domain == "example.de"

    @pytest.mark.parametrize("value", [
        "<<<@@@>>>", "\"unterminated", "a@", "@", ";;;,,,", "Undisclosed recipients:;",
        "=?utf-8?q?broken", "<a@b> (comment", "\x00\x01",
    ])
    def test_addresses_garbage_never_raises(self, value):
        m = msg(f"From: {value}\nTo: {value}\n\nx\n")
        assert isinstance(m.addresses("From"), list)
        assert isinstance(m.from_addr, str)
        assert isinstance(m.from_domain, str)

    def test_addresses_of_thousands_of_headers_are_bounded(self):
        # email.utils parses in pure Python: 3,000 From headers took 0.5 s per parsed message.
        import time

        m = msg("".join(f"From: user{i} <u{i}@example{i % 7}.com>\n" for i in range(3000)) + "\nx\n")
        t0 = time.perf_counter()
        found = m.addresses("From")
        assert time.perf_counter() - t0 < 0.1
        assert len(found) == 100 and m.from_addr == "u0@example0.com"

    def test_missing_headers(self):
        m = msg("\nbody only\n")
        assert m.headers == []
        assert m.subject == ""
        assert m.from_addr == "" and m.from_name == "" and m.from_domain == ""
        assert m.message_id == ""
        assert m.text == "body only\n"


class TestEncodedWords:
    @pytest.mark.parametrize("raw, expected", [
        ("=?utf-8?B?w4ljb2xlIGQnw6l0w6k=?=", "École d'été"),
        ("=?UTF-8?Q?caf=C3=A9_cr=C3=A8me?=", "café crème"),
        ("=?iso-8859-1?q?D=E9j=E0_vu?=", "Déjà vu"),
        ("=?koi8-r?B?8NLJ18XU?=", "Привет"),
        ("Re: =?utf-8?Q?a?= =?utf-8?Q?b?= tail", "Re: ab tail"),
        # A multibyte character split across two encoded-words.
        ("=?utf-8?B?4oI=?= =?utf-8?B?rA==?=", "€"),
        ("=?utf-8*en?Q?lang_tag?=", "lang tag"),
        ("=?utf-8?B?aGVsbG8?=", "hello"),  # missing padding
        ("plain =?not-closed", "plain =?not-closed"),
    ])
    def test_subjects(self, raw, expected):
        m = msg(f"Subject: {raw}\n\nx\n")
        assert m.subject == expected
        assert m.header_raw("Subject") == [raw]

    def test_unknown_charset_is_best_effort(self):
        m = msg("Subject: =?x-klingon?Q?qapla=E9?=\n\nx\n")
        assert m.subject.startswith("qapla")
        assert "MIME_BAD_CHARSET" in m.defects

    def test_bad_base64_word_never_raises(self):
        m = msg("Subject: =?utf-8?B?!!!?= =?utf-8?B?a?= =?utf-8?Q?=ZZ=?=\n\nx\n")
        assert isinstance(m.subject, str)

    @pytest.mark.parametrize("charset", ["base64", "zlib", "rot13", "idna", "punycode", "undefined", "hex"])
    def test_non_text_codecs_are_not_used(self, charset):
        m = msg(f"Subject: =?{charset}?Q?abc?=\n\nx\n")
        assert m.subject == "abc"
        assert "MIME_BAD_CHARSET" in m.defects


class TestMalformedHeaders:
    def test_8bit_header(self):
        m = msg(b"Subject: caf\xe9 \xff\xfe\nFrom: a@b.example\n\nbody\n")
        assert "HEADER_8BIT" in m.defects
        assert m.subject.startswith("caf\ufffd")
        assert "\udce9" not in m.subject
        m.header_block().encode("utf-8")  # no surrogates left

    def test_valid_utf8_header_is_kept(self):
        m = msg("Subject: naïve\n\nbody\n")
        assert m.subject == "naïve"
        assert "HEADER_8BIT" in m.defects

    def test_line_without_colon_is_skipped(self):
        m = msg("From: a@b.example\nthis is garbage\nSubject: kept\n\nbody\n")
        assert "HEADER_NO_COLON" in m.defects
        assert m.subject == "kept"
        assert m.text == "body\n"

    def test_missing_separator_line_starts_body(self):
        m = msg("From: a@b.example\nSubject: s\nHello there, no blank line.\nSecond line.\n")
        assert "HEADER_NO_COLON" in m.defects
        assert m.subject == "s"
        assert m.text == "Hello there, no blank line.\nSecond line.\n"

    def test_leading_continuation_line(self):
        m = msg("  stray continuation\nSubject: s\n\nbody\n")
        assert "HEADER_NO_COLON" in m.defects
        assert m.subject == "s"

    def test_space_before_colon_is_accepted(self):
        m = msg("Subject : spaced\n\nbody\n")
        assert m.subject == "spaced"

    def test_crlf(self):
        m = Message.from_bytes(crlf(SIMPLE))
        assert m.subject == "hello there"
        assert m.text == msg(SIMPLE).text
        assert "\r" not in m.text


# -- robustness -------------------------------------------------------------


def touch(m: Message) -> None:
    """Access every lazily computed attribute."""
    m.text
    m.rawbody
    m.html
    m.urls
    m.attachments
    m.defects
    m.truncated
    m.subject
    m.from_addr
    m.from_domain
    m.message_id
    m.header_block()
    assert set(m.defects) <= DEFECTS


class TestRobustness:
    @pytest.mark.parametrize("raw", [
        b"",
        b"\n",
        b"\r\n\r\n",
        b"From \n",
        b"From sender@example Mon Jan  1 00:00:00 2024",
        b"Subject: only headers",
        b"Subject: only headers\n",
        b"\x00\x00\x00",
        b"Subject: nul\x00inside\n\nbody\x00with nul\n",
        b":\n:\n: :\n\n",
        b"Content-Type: multipart/mixed\n\n",
        b"Content-Type: multipart/mixed; boundary=\n\n--\n",
        b"Content-Type: multipart/mixed; boundary=b\n\n--b",
        b"Content-Type: multipart/mixed; boundary=b\n\n--b\n",
        b"Content-Type: multipart/mixed; boundary=b\n\n--b--",
        b"Content-Type: text/plain; charset=\"\n\n\xff",
        b"Content-Type: ;;;;==;\"\n\nx",
        b"Content-Type: text/plain; name*0*=x'y'%ZZ; name*99999999999=1\n\nx",
        b"Content-Type: text/plain; name*=\n\nx",
        b"Content-Transfer-Encoding: base64\n\n====",
        b"Content-Transfer-Encoding: base64\n\nQ",
        b"Content-Transfer-Encoding: quoted-printable\n\n=\n=Z=",
        b"Content-Type: message/rfc822\n\n",
        b"Content-Type: message/rfc822\n\nContent-Type: multipart/mixed; boundary=q\n\n--q\n",
        b"\xff\xfe\xfd: \xff\n\n\xff",
    ])
    def test_never_raises(self, raw):
        m = Message.from_bytes(raw)
        touch(m)
        parts = m.parts
        assert all(isinstance(part, Part) for part in parts)

    def test_empty_message(self):
        m = Message.from_bytes(b"")
        touch(m)
        assert m.size == 0
        assert m.headers == []
        assert m.text == ""
        assert m.urls == []

    def test_no_body(self):
        m = msg("From: a@b.example\nSubject: no body\n")
        touch(m)
        assert m.subject == "no body"
        assert m.text == ""

    def test_nul_bytes(self):
        m = msg(b"Subject: a\x00b\n\nbefore\x00after http://nul.example/x\x00y\n")
        touch(m)
        assert m.subject == "a\x00b"
        assert "before\x00after" in m.text
        assert [u.host for u in m.urls] == ["nul.example"]

    def test_deep_nesting_is_capped(self):
        depth = 60
        lines = ["From: a@b.example", "MIME-Version: 1.0",
                 "Content-Type: multipart/mixed; boundary=b0", ""]
        for level in range(1, depth):
            lines += [f"--b{level - 1}", f"Content-Type: multipart/mixed; boundary=b{level}", ""]
        lines += [f"--b{depth - 1}", "Content-Type: text/plain", "", "deep text"]
        for level in reversed(range(depth)):
            lines.append(f"--b{level}--")
        m = msg("\n".join(lines) + "\n")
        touch(m)
        assert "MIME_TOO_DEEP" in m.defects
        assert max(part.depth for part in m.parts) <= MAX_DEPTH

    def test_part_count_is_capped(self):
        body = "".join(f"--b\nContent-Type: text/plain\n\npart {n}\n" for n in range(MAX_PARTS + 500))
        m = msg("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n" + body + "--b--\n")
        touch(m)
        assert len(m.parts) == MAX_PARTS
        assert "MIME_TOO_MANY_PARTS" in m.defects

    @pytest.mark.parametrize("raw", [
        b"To: " + b"(" * 20_000 + b"\nFrom: <" + b"(" * 20_000 + b"a@b.example>\n\nx",
        b"Subject: x\n\nhttp://x.example/" + b")" * 200_000,
        b"Content-Type: text/plain; " + b"a" * 200_000 + b"\n\nx",
        b"Content-Type: text/plain; " + b'a="' * 50_000 + b"\n\nx",
        b"Subject: " + b"=?" * 100_000 + b"\n\nx",
        b"From: a\n" + b"garbage line\nX: y\n" * 20_000 + b"\nbody",
        b"Content-Type: text/html\n\n" + b"<a href=x>" * 50_000,
        b"Content-Type: text/html\n\n" + b"&amp" * 100_000 + b"<a " * 100_000,
    ], ids=["nested-comments", "parens", "param-run", "param-quotes", "ew-run",
            "garbage-headers", "many-links", "entities-and-lt"])
    def test_hostile_input_is_linear(self, raw):
        import time
        start = time.perf_counter()
        m = Message.from_bytes(raw)
        touch(m)
        m.addresses("To")
        m.addresses("From")
        assert time.perf_counter() - start < 2.0

    def test_urls_are_capped(self):
        body = " ".join(f"http://h{n}.example/" for n in range(2000))
        m = msg("Subject: many\n\n" + body + "\n")
        assert len(m.urls) == 500


class TestMimeDefects:
    def test_missing_boundary_parameter(self):
        m = msg("MIME-Version: 1.0\nContent-Type: multipart/mixed\n\nsome text\n")
        assert "MIME_BAD_BOUNDARY" in m.defects
        # The body is still shown to text rules.
        assert m.text == "some text\n"

    def test_start_boundary_not_found(self):
        m = msg("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"zz\"\n\n"
                "--other\nContent-Type: text/plain\n\nhello\n--other--\n")
        assert "MIME_BAD_BOUNDARY" in m.defects
        assert "hello" in m.text

    def test_no_closing_boundary(self):
        m = msg("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=zz\n\n"
                "--zz\nContent-Type: text/plain\n\nfirst\n--zz\nContent-Type: text/plain\n\nsecond\n")
        assert "MIME_BAD_BOUNDARY" in m.defects
        assert [p.text for p in m.parts] == ["first", "second\n"]

    def test_boundary_prefix_of_longer_boundary(self):
        m = msg("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=ab\n\n"
                "--ab\nContent-Type: multipart/alternative; boundary=abc\n\n"
                "--abc\nContent-Type: text/plain\n\ninner\n--abc--\n"
                "--ab\nContent-Type: text/plain\n\nouter\n--ab--\n")
        assert m.defects == []
        assert [p.text for p in m.parts] == ["inner", "outer"]
        assert [p.depth for p in m.parts] == [2, 1]

    def test_closing_delimiter_with_trailing_junk(self):
        m = msg("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=zz\n\n"
                "--zz\nContent-Type: text/plain\n\nbody\n--zz--</BODY></HTML>\n")
        assert m.defects == []
        assert [p.text for p in m.parts] == ["body"]

    def test_missing_mime_version(self):
        m = msg("Content-Type: multipart/mixed; boundary=zz\n\n--zz\n\nx\n--zz--\n")
        assert "MIME_MISSING_VERSION" in m.defects
        assert "MIME_MISSING_VERSION" not in msg(MULTI_ALT).defects

    def test_bad_base64(self):
        m = msg("MIME-Version: 1.0\nContent-Type: text/plain\nContent-Transfer-Encoding: base64\n\n"
                "aGVsbG8gd29ybGQ=\n*** this is not base64 ***\n")
        assert "MIME_BAD_BASE64" in m.defects
        assert m.parts[0].payload.startswith(b"hello world")

    def test_base64_bad_padding(self):
        m = msg("Content-Transfer-Encoding: base64\n\naGVsbG8gd29ybGQ\n")
        assert "MIME_BAD_BASE64" in m.defects
        assert m.text.startswith("hello wor")

    def test_base64_padding_mid_stream(self):
        # binascii stops at the first pad; MUAs do not, so neither do we.
        m = msg("Content-Transfer-Encoding: base64\n\naGVsbG8=\nIHdvcmxk\n")
        assert m.text == "hello world"
        assert "MIME_BAD_BASE64" in m.defects

    def test_good_base64_has_no_defect(self):
        encoded = base64.encodebytes("grüße".encode("utf-8")).decode()
        m = msg("Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: BASE64\n\n" + encoded)
        assert m.defects == []
        assert m.text == "grüße"
        assert m.parts[0].transfer_encoding == "base64"
        assert m.parts[0].size == len("grüße".encode("utf-8"))

    def test_unknown_body_charset(self):
        m = msg(b"Content-Type: text/plain; charset=x-martian\n\ncaf\xe9\n")
        assert "MIME_BAD_CHARSET" in m.defects
        assert m.text == "café\n"  # utf-8 failed, windows-1252 guess
        assert m.parts[0].charset == "x-martian"

    def test_charset_with_a_nul_is_unknown(self):
        # codecs.lookup raises ValueError (not LookupError) for a name with a NUL in it.
        m = msg(b"Subject: =?utf\x00-8?Q?caf=C3=A9?=\nContent-Type: text/plain; charset=\"us-ascii\x00\"\n\ncaf\xe9\n")
        assert "MIME_BAD_CHARSET" in m.defects
        assert m.text == "caf\xe9\n"

    def test_utf7_lone_surrogates_become_replacement_characters(self):
        # UTF-7 decodes "+3AE-" to a lone surrogate even with errors="replace"; the rule
        # engine (RE2) then failed to encode the text and the whole message failed.
        m = msg(b"Subject: =?utf-7?Q?+3AE-x?=\nContent-Type: text/plain; charset=utf-7\n\na+3AE-b +2D3cAQ-\n")
        assert m.text == "a\ufffdb \U0001f401\n" and m.subject == "\ufffdx"
        m.text.encode("utf-8")

    def test_unknown_body_charset_utf8_guess(self):
        m = msg("Content-Type: text/plain; charset=x-martian\n\ncafé\n")
        assert m.text == "café\n"

    def test_latin1_read_as_windows_1252(self):
        m = msg(b"Content-Type: text/plain; charset=iso-8859-1\n\n\x93quoted\x94 \xe9\n")
        assert m.text == "\u201cquoted\u201d é\n"
        assert m.defects == []

    def test_us_ascii_with_8bit_content(self):
        m = msg("Content-Type: text/plain; charset=us-ascii\n\nnaïve\n")
        assert m.text == "naïve\n"
        assert m.defects == []

    def test_quoted_printable(self):
        m = msg("Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n\n"
                "caf=C3=A9 soft=\nbreak http://example.com/very/long/=\npath\n")
        assert m.text == "café softbreak http://example.com/very/long/path\n"
        assert [u.url for u in m.urls] == ["http://example.com/very/long/path"]


# -- MIME structure -----------------------------------------------------------


class TestParts:
    def test_single_part_defaults(self):
        m = msg(SIMPLE)
        (part,) = m.parts
        assert part.content_type == "text/plain"
        assert part.charset == ""
        assert part.filename == ""
        assert part.disposition == ""
        assert part.transfer_encoding == ""
        assert part.depth == 0
        assert not part.is_attachment and not part.is_html
        assert part.size == len(part.payload)

    def test_alternative_skips_html_in_text(self):
        m = msg(MULTI_ALT)
        assert [p.content_type for p in m.parts] == ["text/plain", "text/html"]
        assert [p.depth for p in m.parts] == [1, 1]
        assert m.text == "plain version http://plain.example/"
        assert "preamble" not in m.text and "epilogue" not in m.text
        assert "<a href" in m.rawbody and "plain version" in m.rawbody
        assert m.html.startswith("<html>")
        # Links still come from the skipped HTML.
        assert ("http://html.example/", "click", "html") in [(u.url, u.text, u.source) for u in m.urls]

    def test_html_only_alternative_is_reduced(self):
        m = msg("MIME-Version: 1.0\nContent-Type: multipart/alternative; boundary=q\n\n"
                "--q\nContent-Type: text/html\n\n<p>only <b>html</b></p>\n--q--\n")
        assert m.text == "only html"

    def test_html_outside_alternative_is_kept(self):
        m = msg("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=q\n\n"
                "--q\nContent-Type: text/plain\n\nplain\n--q\nContent-Type: text/html\n\n<p>html</p>\n--q--\n")
        assert m.text == "plain\nhtml"

    def test_nested_related_inside_alternative(self):
        m = msg("MIME-Version: 1.0\nContent-Type: multipart/alternative; boundary=a\n\n"
                "--a\nContent-Type: text/plain\n\nplain\n"
                "--a\nContent-Type: multipart/related; boundary=r\n\n"
                "--r\nContent-Type: text/html\n\n<p>html</p>\n"
                "--r\nContent-Type: image/gif\nContent-Transfer-Encoding: base64\n\nR0lGODlh\n--r--\n"
                "--a--\n")
        assert m.text == "plain"
        assert [p.content_type for p in m.parts] == ["text/plain", "text/html", "image/gif"]
        assert [p.content_type for p in m.attachments] == ["image/gif"]
        assert m.parts[2].payload == b"GIF89a"

    def test_attachment_rfc2231_filename(self):
        m = msg("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=q\n\n"
                "--q\nContent-Type: text/plain\n\nsee attached\n"
                "--q\nContent-Type: application/pdf\n"
                "Content-Disposition: attachment;\n filename*=UTF-8''%E2%82%AC%20rates.pdf\n"
                "Content-Transfer-Encoding: base64\n\nJVBERi0=\n--q--\n")
        (att,) = m.attachments
        assert att.filename == "€ rates.pdf"
        assert att.disposition == "attachment"
        assert att.payload == b"%PDF-"
        assert att.text is None
        assert m.text == "see attached"

    def test_rfc2231_continuations(self):
        m = msg("Content-Type: application/octet-stream;\n"
                " name*0*=iso-8859-1'fr'r%E9sum;\n name*1*=%E9;\n name*2=\".exe\"\n\nx")
        assert m.parts[0].filename == "résumé.exe"
        assert m.parts[0].is_attachment

    def test_rfc2047_filename(self):
        m = msg("Content-Type: application/zip; name=\"=?utf-8?B?w6TDtsO8LnppcA==?=\"\n\nx")
        assert m.parts[0].filename == "äöü.zip"

    def test_inline_text_with_filename_is_attachment(self):
        m = msg("Content-Type: text/plain\nContent-Disposition: inline; filename=notes.txt\n\nhi\n")
        (part,) = m.parts
        assert part.disposition == "inline"
        assert part.is_attachment
        assert part.text == "hi\n"

    def test_content_type_without_subtype(self):
        m = msg("Content-Type: text\n\nhi\n")
        assert m.parts[0].content_type == "text/plain"

    def test_message_rfc822_attachment(self):
        m = msg("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=q\n\n"
                "--q\nContent-Type: text/plain\n\ncover\n"
                "--q\nContent-Type: message/rfc822\n\nSubject: inner\n\ninner text http://inner.example/\n"
                "--q--\n")
        types = [p.content_type for p in m.parts]
        assert types == ["text/plain", "message/rfc822", "text/plain"]
        assert m.parts[1].is_attachment
        assert m.parts[1].payload.startswith(b"Subject: inner")
        assert "inner text" in m.text
        assert "inner.example" in [u.host for u in m.urls]

    def test_case_insensitive_content_headers(self):
        m = msg("content-type: TEXT/HTML; CHARSET=\"UTF-8\"\ncontent-transfer-encoding: Quoted-Printable\n\n"
                "<b>caf=C3=A9</b>\n")
        (part,) = m.parts
        assert part.content_type == "text/html"
        assert part.charset == "utf-8"
        assert part.transfer_encoding == "quoted-printable"
        assert part.is_html
        assert m.text == "café"


# -- text and HTML ------------------------------------------------------------


class TestHtml:
    def test_html_to_text(self):
        markup = (
            "<html><head><title>T</title><style>p {color: red}</style>"
            "<script type='text/javascript'>var x = '<p>no</p>';</script></head>"
            "<body><p>First&nbsp;para &amp; more</p><p>Second<br>line<BR/>third</p>"
            "<!-- hidden comment -->V<b></b>iagra &#x41;&#66; &lt;tag&gt;"
            "<table><tr><td>cell1</td><td>cell2</td></tr></table></body></html>"
        )
        text = html_to_text(markup)
        assert text.split("\n") == [
            "T", "First para & more", "Second", "line", "third", "Viagra AB <tag>", "cell1 cell2",
        ]
        assert "color" not in text and "var x" not in text and "hidden" not in text

    def test_unclosed_constructs(self):
        assert html_to_text("visible<!-- never closed <p>hidden") == "visible"
        assert html_to_text("a<script>x") == "a"
        assert html_to_text("1 < 2 and 3 > 2") == "1 < 2 and 3 > 2"
        assert html_to_text("<p unclosed tag text") == "<p unclosed tag text"

    def test_numeric_references_of_thousands_of_digits(self):
        # html.unescape raised ValueError past 4,300 digits (Python's int limit).
        huge, padded = "&#" + "9" * 5000 + ";", "&#" + "0" * 5000 + "65;"
        assert html_to_text(f"<p>a{huge}b{padded}</p>") == "a\ufffdbA"
        assert extract_links(f'<a href="http://x.example/{huge}">t{padded}</a>')[0][1] == "http://x.example/\ufffd"
        m = msg(f"Content-Type: text/html\n\n<a href='http://x.example/{padded}'>{huge}</a>\n")
        assert m.text == "\ufffd" and m.urls[0].url == "http://x.example/A"

    def test_hostile_html_is_fast(self):
        import time
        hostile = "<a " * 100_000 + "<!--" * 10_000 + "<script" * 10_000
        start = time.perf_counter()
        html_to_text(hostile)
        extract_links(hostile)
        assert time.perf_counter() - start < 2.0

    def test_links_with_text(self):
        links = extract_links(
            '<a href="http://evil.example/login">https://www.paypal.com/</a>'
            "<A HREF='http://x.example/?a=1&amp;b=2'>Click <b>here</b>\n now</A>"
            '<a href="#top">top</a><a name="anchor">no href</a>'
            '<map><area shape=rect href="http://area.example/"></map>'
            '<form method=post action="https://form.example/post">'
            '<a href=http://unclosed.example/>tail text'
        )
        assert links == [
            ("a", "http://evil.example/login", "https://www.paypal.com/"),
            ("a", "http://x.example/?a=1&b=2", "Click here now"),
            ("area", "http://area.example/", None),
            ("form", "https://form.example/post", None),
            ("a", "http://unclosed.example/", "tail text"),
        ]

    def test_message_html_urls(self):
        m = msg("Content-Type: text/html\n\n"
                '<p>Visit <a href="http://evil.example/login">https://www.paypal.com/</a> now</p>'
                '<form action="https://form.example/post"></form>')
        urls = [(u.url, u.host, u.text, u.source) for u in m.urls]
        assert ("http://evil.example/login", "evil.example", "https://www.paypal.com/", "html") in urls
        assert ("https://form.example/post", "form.example", None, "html") in urls
        # The visible text is prose too.
        assert ("https://www.paypal.com/", "www.paypal.com", None, "text") in urls
        assert m.text == "Visit https://www.paypal.com/ now"
        assert m.html.startswith("<p>Visit")

    def test_dedup_by_url_and_text(self):
        m = msg("Content-Type: text/html\n\n"
                '<a href="http://a.example/">one</a><a href="http://a.example/">one</a>'
                '<a href="http://a.example/">two</a>')
        assert [(u.url, u.text) for u in m.urls] == [("http://a.example/", "one"), ("http://a.example/", "two")]


class TestUrls:
    @pytest.mark.parametrize("text, expected", [
        ("see http://example.com/a.", "http://example.com/a"),
        ("(http://example.com/a)", "http://example.com/a"),
        ("http://en.example/wiki/Foo_(bar)", "http://en.example/wiki/Foo_(bar)"),
        ("'http://example.com/q?x=1';", "http://example.com/q?x=1"),
        ("<http://example.com/>", "http://example.com/"),
        ('"http://example.com/x",', "http://example.com/x"),
        ("go to www.example.org!", "www.example.org"),
        ("HTTPS://Example.COM/Path", "HTTPS://Example.COM/Path"),
        ("ftp://files.example/pub", "ftp://files.example/pub"),
    ])
    def test_text_url_trailing_punctuation(self, text, expected):
        assert [u.url for u in find_text_urls(text)] == [expected]

    def test_bare_www(self):
        (url,) = find_text_urls("Call now! www.Cheap-Meds.example/buy today")
        assert (url.url, url.scheme, url.host, url.text, url.source) == (
            "www.Cheap-Meds.example/buy", "", "www.cheap-meds.example", None, "text")

    @pytest.mark.parametrize("text", ["awww.example.com", "see www.example", "foo.www.example.com", "a@www.b.example"])
    def test_not_urls(self, text):
        assert find_text_urls(text) == []

    def test_mailto(self):
        (url,) = find_text_urls("write to mailto:Sales@Example.COM?subject=hi.")
        assert (url.scheme, url.host) == ("mailto", "example.com")

    @pytest.mark.parametrize("url, scheme, host", [
        ("http://xn--bcher-kva.example/", "http", "bücher.example"),
        ("http://XN--BCHER-KVA.EXAMPLE./x", "http", "bücher.example"),
        ("http://xn--e1afmkfd.xn--p1ai/", "http", "пример.рф"),
        ("http://xn--ab-.example/", "http", "xn--ab-.example"),  # does not round-trip
        ("http://xn--g.example/", "http", "xn--g.example"),  # incomplete punycode
        ("http://xn--abc-def.example/", "http", "xn--abc-def.example"),  # bidi violation
        ("http://xn--a.example/", "http", "xn--a.example"),
        ("http://xn--.example/", "http", "xn--.example"),
        ("http://user:pw@Host.Example:8080/p", "http", "host.example"),
        ("http://[2001:db8::1]:80/", "http", "2001:db8::1"),
        ("http://192.0.2.1/", "http", "192.0.2.1"),
        ("http://3232235777/", "http", "3232235777"),
        ("https://paypal.com@evil.example/", "https", "evil.example"),
        ("http://%65vil.example/", "http", "evil.example"),
        ("http:\\\\evil.example\\x", "http", "evil.example"),
        ("//cdn.example/x.js", "", "cdn.example"),
        ("javascript:alert(1)", "javascript", ""),
        ("relative/page.html", "", ""),
        ("http://bücher.example/", "http", "bücher.example"),
    ])
    def test_host_normalisation(self, url, scheme, host):
        parsed = make_url(url, None, "html")
        assert isinstance(parsed, Url)
        assert (parsed.scheme, parsed.host) == (scheme, host)

    def test_normalize_host_never_raises(self):
        for host in ["xn--", "xn--a", "xn--" + "a" * 300, "a..b", "", ".", "xn--ls8h.xn--\udcff", "%ff%fe"]:
            assert isinstance(normalize_host(host), str)

    def test_strip_trailing(self):
        assert strip_trailing("http://x/a)).,;'\">") == "http://x/a"


# -- construction -------------------------------------------------------------


class TestConstruction:
    def test_mbox_from_line_is_ignored(self):
        raw = b"From sender@example.com  Thu Aug 22 13:17:22 2002\n" + SIMPLE.encode()
        m = Message.from_bytes(raw)
        assert [h.name for h in m.headers][0] == "From"
        assert m.from_addr == "alice@example.com"
        assert m.size == len(SIMPLE.encode())
        assert "HEADER_NO_COLON" not in m.defects

    def test_size(self):
        raw = crlf(SIMPLE)
        assert Message.from_bytes(raw).size == len(raw)

    @pytest.mark.parametrize("source", [SIMPLE, MULTI_ALT])
    def test_from_parts_file_equals_from_bytes(self, source):
        raw = crlf(source)
        whole = Message.from_bytes(raw)
        head, _, body = raw.partition(b"\r\n\r\n")
        # Headers as a milter receives them: name and value, folding kept,
        # leading space after the colon removed.
        pairs = []
        for line in head.decode().split("\r\n"):
            if line[0] in " \t":
                name, value = pairs[-1]
                pairs[-1] = (name, value + "\r\n" + line)
            else:
                name, _, value = line.partition(":")
                pairs.append((name, value.lstrip()))
        with tempfile.SpooledTemporaryFile() as spool:
            spool.write(body)  # left positioned at the end on purpose
            parted = Message.from_parts(pairs, spool)
        for m in (parted, Message.from_parts(pairs, body)):
            assert m.headers == whole.headers
            assert m.parts == whole.parts
            assert m.text == whole.text
            assert m.rawbody == whole.rawbody
            assert m.urls == whole.urls
            assert m.defects == whole.defects
            assert m.size == whole.size
            assert not m.truncated

    def test_from_parts_8bit_surrogates(self):
        value = b"caf\xe9".decode("utf-8", "surrogateescape")
        m = Message.from_parts([("Subject", value)], b"body\r\n")
        assert m.subject == "caf\ufffd"
        assert "HEADER_8BIT" in m.defects

    def test_from_parts_reads_only_max_scan_bytes(self):
        body = io.BytesIO(b"line of text\n" * 10_000)
        m = Message.from_parts([("Subject", "big")], body, max_scan_bytes=1000)
        assert m.truncated
        assert len(m.text) <= 1000
        assert m.size == len(b"Subject: big\r\n") + 2 + 130_000

    def test_from_parts_body_size_override(self):
        m = Message.from_parts([("Subject", "x")], b"abc", body_size=5_000_000)
        assert m.size == len(b"Subject: x\r\n") + 2 + 5_000_000
        assert not m.truncated

    def test_truncation_with_max_scan_bytes(self):
        encoded = base64.encodebytes(b"\x00" * 30_000).decode()
        source = ("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=q\n\n"
                  "--q\nContent-Type: text/plain\n\nhello http://first.example/\n"
                  "--q\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
                  + encoded + "--q--\n")
        full = msg(source)
        assert not full.truncated and full.defects == []
        cut = msg(source, max_scan_bytes=5_000)
        assert cut.truncated
        assert cut.size == full.size
        assert cut.text == "hello http://first.example/"
        # A boundary or base64 cut short by the scan limit is not a defect.
        assert cut.defects == []
        assert cut.attachments[0].size < full.attachments[0].size

    def test_text_cap(self):
        m = msg("Subject: long\n\n" + "word " * 10_000, max_text_chars=1000)
        assert len(m.text) == 1000
        assert len(m.rawbody) == 1000
        assert m.truncated

    def test_html_cap(self):
        m = msg("Content-Type: text/html\n\n" + "<p>word</p>" * 1000, max_text_chars=500)
        assert len(m.html) == 500
        assert m.truncated


# -- corpus -------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["ham", "hard_ham", "spam"])
def test_corpus_parses(folder):
    files = sorted((CORPUS / folder).glob("*.eml"))
    if not files:
        pytest.skip(f"corpus folder {folder} not available")
    for path in files:
        m = Message.from_bytes(path.read_bytes())
        touch(m)
        assert all(url.source in ("text", "html", "pdf", "qr", "redirect") for url in m.urls), path.name
        for part in m.parts:
            assert part.size == len(part.payload), path.name
            assert (part.text is None) == (not part.content_type.startswith("text/")), path.name


@pytest.mark.parametrize("value", [
    '"TheCashSystem" <Thecashsystem@firemail.de>', "John  Smith <j@x.org>", " j@x.org ", "<a@b.c>",
    '"A, B" <a@b.c>', "J. Smith <j@x.org>", '"q\\"x" <a@b>', "a..b@c.d", '"" <a@b.c>', "x <a@b.c> (c)",
    "a@b.c, d@e.f", "Ma\tx <a@b.c>", "<a@[1.2.3.4]>", "Undisclosed recipients:;", "=?utf-8?q?J=C3=B6rg?= <j@x.org>",
])
def test_plain_addresses_read_as_the_email_package_reads_them(value):
    import email.utils

    from milterguard.mail.addresses import simple_addresses

    fast = simple_addresses(value)
    assert fast is None or fast == email.utils.getaddresses([value])


def test_plain_address_reading_agrees_on_the_corpus():
    import email
    import email.policy
    import email.utils

    from milterguard.mail.addresses import simple_addresses

    checked = 0
    for path in sorted(CORPUS.glob("*/*.eml"))[::2]:
        msg = email.message_from_binary_file(path.open("rb"), policy=email.policy.compat32)
        for name in ("From", "To", "Cc", "Reply-To", "Sender"):
            for value in msg.get_all(name, []):
                fast = simple_addresses(str(value))
                if fast is not None:
                    checked += 1
                    assert fast == email.utils.getaddresses([str(value)]), value
    assert checked > 3000
