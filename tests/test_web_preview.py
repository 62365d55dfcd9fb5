"""The safe preview of held mail (milterguard/web/preview.py), on hostile and broken messages.
The browser's view of it is in test_web.py."""

from __future__ import annotations

from milterguard.web.preview import clean_html, header_list, preview_document

HOSTILE = (b"From: <a@example.com>\r\nSubject: =?utf-8?q?caf=C3=A9_<b>bold</b>?=\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/alternative; boundary=XX\r\n\r\n--XX\r\nContent-Type: text/plain\r\n\r\n"
           b"plain part\r\n--XX\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
           b"<p onclick=\"alert(1)\">hi</p><script>alert(2)</script><img src=\"http://127.0.0.9:9/t.png\">"
           b"<a href=\"http://127.0.0.9:9/\">link</a><a href=\"mailto:x@example.com\">mail</a>"
           b"<style>body{background:url(http://127.0.0.9:9/b.png)}</style><form action=\"http://127.0.0.9:9/\">"
           b"<input name=q></form><iframe src=\"http://127.0.0.9:9/\"></iframe>"
           b"<svg><image href=\"http://127.0.0.9:9/s.png\"/></svg>\r\n--XX--\r\n")


def test_the_html_part_is_shown_cleaned_of_everything_that_runs_or_loads():
    doc = preview_document(HOSTILE)
    body = doc.split("<body>", 1)[1]  # after the preview's own head
    assert "hi" in body and "plain part" not in body  # the HTML part, as a mail reader shows
    for gone in ("<script", "onclick", "alert(", "<img", "127.0.0.9", "<style", "<form", "<input", "<iframe",
                 "<svg", "<image"):
        assert gone not in body, gone
    assert 'href="mailto:x@example.com"' in body


def test_text_is_escaped_and_broken_messages_still_show():
    doc = preview_document(b"Subject: x\r\n\r\n<script>alert(1)</script> & more\r\n")
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in doc and "<script>" not in doc
    broken = b"Content-Type: multipart/mixed; boundary=\"\r\nContent-Transfer-Encoding: base64\r\n\r\n\xff\xfe\x00 junk"
    assert "<body>" in preview_document(broken)
    assert preview_document(b"") and preview_document(b"no headers at all")


def test_headers_are_decoded_as_text():
    assert ("Subject", "café <b>bold</b>") in header_list(HOSTILE)  # shown escaped by the template


def test_clean_html_keeps_text_and_plain_markup():
    assert clean_html("<p>a <b>b</b> <i>c</i></p><ul><li>d</li></ul>") == "<p>a <b>b</b> <i>c</i></p><ul><li>d</li></ul>"
