"""Links carried by attachments: PDF link annotations, QR codes in images and in PDFs, scripts of
attached web pages and SVG images. The images and PDFs are made here (qrcode, Pillow, pypdf)."""

from __future__ import annotations

import base64
import io

import pytest

from milterguard.config import load_config
from milterguard.engine.core import Engine
from milterguard.mail.attached import LinkLimits, attached_links, pdf_links, qr_texts
from milterguard.mail.message import Message
from milterguard.model import Connection, Transaction
from milterguard.mail.raw import split_message

qrcode = pytest.importorskip("qrcode")
from PIL import Image  # noqa: E402
from pypdf import PdfWriter  # noqa: E402
from pypdf.annotations import Link  # noqa: E402
from pypdf.generic import ArrayObject, DictionaryObject, NameObject, TextStringObject  # noqa: E402

PHISH = "https://m365-login.phish-kit.test/auth?u=bob"


def qr_image(text: str, box: int = 6) -> Image.Image:
    return qrcode.make(text, box_size=box, border=4).get_image().convert("RGB")


def image_bytes(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def pdf_with(link: str | None = None, image: Image.Image | None = None, open_action: str | None = None) -> bytes:
    """A one-page PDF: a picture (as Pillow writes it: an image XObject) or a blank page, with a link."""
    if image is not None:
        writer = PdfWriter(clone_from=io.BytesIO(image_bytes(image, "PDF")))
    else:
        writer = PdfWriter()
        writer.add_blank_page(width=300, height=300)
    if link:
        writer.add_annotation(page_number=0, annotation=Link(rect=(10, 10, 200, 40), url=link))
    if open_action:
        writer._root_object[NameObject("/OpenAction")] = DictionaryObject(
            {NameObject("/S"): NameObject("/URI"), NameObject("/URI"): TextStringObject(open_action)})
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


def message_with(parts: list[tuple[str, str, bytes]], text: str = "Please see the attached file.") -> bytes:
    out = ["From: Accounts <accounts@example.net>\nTo: bob@example.org\nSubject: Document for you\n"
           "Date: Mon, 02 Sep 2024 10:00:00 +0000\nMessage-ID: <links@example.net>\nMIME-Version: 1.0\n"
           f'Content-Type: multipart/mixed; boundary="b1"\n\n--b1\nContent-Type: text/plain\n\n{text}\n']
    for filename, ctype, data in parts:
        encoded = base64.encodebytes(data).decode()
        disposition = f'attachment; filename="{filename}"' if filename else "inline"
        out.append(f"--b1\nContent-Type: {ctype}\nContent-Disposition: {disposition}\n"
                   f"Content-Transfer-Encoding: base64\n\n{encoded}")
    out.append("--b1--\n")
    return "".join(out).encode()


@pytest.fixture(scope="module")
def engine_with(tmp_path_factory):
    cache = {}

    def get(*sets: str) -> Engine:
        if sets not in cache:
            cache[sets] = Engine.load(load_config(etc_dir=tmp_path_factory.mktemp("etc"),
                                                  sets=["dns.enabled=false", *sets]), strict=True)
        return cache[sets]

    return get


def verdict_of(engine: Engine, raw: bytes):
    headers, body = split_message(raw)
    txn = Transaction(mail_from="accounts@example.net", rcpts=["bob@example.org"], headers=headers, body=body,
                      body_size=len(body))
    return engine.evaluate(Connection(client_ip="192.0.2.1", client_name="[192.0.2.1]", helo="mx.example.net"), txn)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF"])
def test_qr_code_in_an_image_is_read(fmt):
    assert qr_texts(image_bytes(qr_image(PHISH), fmt), LinkLimits()) == [PHISH]


def test_an_image_without_a_qr_code_gives_nothing():
    photo = Image.new("RGB", (300, 200), (200, 120, 40))
    assert qr_texts(image_bytes(photo, "PNG"), LinkLimits()) == []


def test_images_over_the_limits_are_not_decoded():
    data = image_bytes(qr_image(PHISH), "PNG")
    side = Image.open(io.BytesIO(data)).size[0]
    assert qr_texts(data, LinkLimits(image_max_pixels=side * side - 1)) == []
    assert qr_texts(data, LinkLimits(image_max_bytes=len(data) - 1)) == []
    assert qr_texts(data, LinkLimits(image_max_pixels=side * side)) == [PHISH]


def test_broken_images_and_pdfs_give_nothing_and_do_not_raise():
    png = image_bytes(qr_image(PHISH), "PNG")
    assert qr_texts(png[: len(png) // 2], LinkLimits()) == []
    assert qr_texts(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, LinkLimits()) == []
    pdf = pdf_with(link=PHISH)
    for broken in (pdf[: len(pdf) // 2], b"%PDF-1.7\n" + b"\xff" * 500, b"%PDF-1.4\n1 0 obj << /Type /Catalog"):
        assert isinstance(pdf_links(broken, "x.pdf", LinkLimits()), list)


def test_pdf_link_annotation_and_open_action():
    links = pdf_links(pdf_with(link=PHISH, open_action="https://open.example.test/x"), "doc.pdf", LinkLimits())
    assert {(link.url, link.source) for link in links} == {(PHISH, "pdf"), ("https://open.example.test/x", "pdf")}
    assert any(link.where == "doc.pdf page 1" for link in links)


def test_pdf_over_the_limits_is_not_read():
    data = pdf_with(link=PHISH)
    assert pdf_links(data, "doc.pdf", LinkLimits(pdf_max_bytes=len(data) - 1)) == []
    writer = PdfWriter()
    for _ in range(3):
        writer.add_blank_page(width=300, height=300)
    writer.add_annotation(page_number=2, annotation=Link(rect=(10, 10, 200, 40), url=PHISH))
    buf = io.BytesIO()
    writer.write(buf)
    assert pdf_links(buf.getvalue(), "doc.pdf", LinkLimits(pdf_max_pages=2)) == []
    assert [link.url for link in pdf_links(buf.getvalue(), "doc.pdf", LinkLimits(pdf_max_pages=3))] == [PHISH]


def test_qr_code_in_a_pdf_image_is_read():
    links = pdf_links(pdf_with(image=qr_image(PHISH)), "scan.pdf", LinkLimits())
    assert [(link.url, link.source) for link in links] == [(PHISH, "qr")]
    assert pdf_links(pdf_with(image=qr_image(PHISH)), "scan.pdf", LinkLimits(max_images=0)) == []


def test_qr_urls_join_the_message_urls_and_the_url_checks(engine_with):
    """A QR code's URL goes where a link of the text goes: map rules, lookalikes, the URL shape checks."""
    target = "https://bit.ly/3xYzAbC"
    raw = message_with([("", "image/png", image_bytes(qr_image(target), "PNG"))], text="Scan to keep your mailbox.")
    msg = Message.from_bytes(raw)
    assert [(u.url, u.host, u.source) for u in msg.urls] == [(target, "bit.ly", "qr")]
    verdict = verdict_of(engine_with(), raw)
    assert {"QR_CODE_URL", "URI_SHORTENER"} <= set(verdict.symbols)
    hit = verdict.hit("QR_CODE_URL")
    assert target[:40] in hit.text and "part 2 (image/png)" in hit.where


def test_pdf_link_reaches_the_lookalike_check(engine_with):
    raw = message_with([("invoice.pdf", "application/pdf", pdf_with(link="https://paypa1.com/signin"))])
    verdict = verdict_of(engine_with(), raw)
    assert {"PDF_LINK", "PHISH_LOOKALIKE_URL"} <= set(verdict.symbols)


def test_data_url_image_in_html_is_read():
    png = base64.b64encode(image_bytes(qr_image(PHISH), "PNG")).decode()
    html = f'<html><body><p>Scan this</p><img src="data:image/png;base64,{png}"></body></html>'
    links = attached_links([], [html], LinkLimits())
    assert [(link.url, link.source) for link in links] == [(PHISH, "qr")]


def test_switched_off_and_without_images_nothing_is_read(engine_with):
    raw = message_with([("", "image/png", image_bytes(qr_image(PHISH), "PNG"))])
    assert "QR_CODE_URL" not in verdict_of(engine_with("attachments.links=false"), raw).symbols
    plain = message_with([("notes.txt", "text/plain", b"Nothing to see here.\n")])
    msg = Message.from_bytes(plain)
    assert msg.attached_links == [] and msg.urls == []


def test_a_logo_and_a_plain_pdf_do_not_fire(engine_with):
    logo = image_bytes(Image.new("RGB", (120, 60), (10, 60, 160)), "PNG")
    raw = message_with([("", "image/png", logo), ("report.pdf", "application/pdf", pdf_with())])
    assert not {"QR_CODE_URL", "PDF_LINK"} & set(verdict_of(engine_with(), raw).symbols)


def test_script_urls_of_an_svg_attachment_join_the_urls(engine_with):
    svg = (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><script>'
           b'window.location.href = "https://docs-share.phish-kit.test/view?id=77";</script></svg>')
    raw = message_with([("Invoice.svg", "image/svg+xml", svg)])
    msg = Message.from_bytes(raw)
    assert "docs-share.phish-kit.test" in {u.host for u in msg.urls}
    assert {"MIME_SVG_ACTIVE", "MIME_HTML_ATTACH_REDIRECT"} <= set(verdict_of(engine_with(), raw).symbols)


def test_base64_hidden_target_of_an_attached_page_joins_the_urls():
    hidden = base64.b64encode(b"https://collect.phish-kit.test/p").decode()
    page = f'<html><form id="f"></form><script>f.action = atob("{hidden}");</script></html>'.encode()
    msg = Message.from_bytes(message_with([("Statement.html", "text/html", page)]))
    assert ("collect.phish-kit.test", "html") in {(u.host, u.source) for u in msg.urls}
    assert any(link.where == "Statement.html (base64 in its script)" for link in msg.attached_links)


def test_damaged_pdfs_and_images_never_raise():
    """Bytes flipped at random places (a fixed seed, a bounded count): whatever is read, nothing raises."""
    import random

    rng = random.Random(14)
    pdf = pdf_with(link=PHISH, image=qr_image(PHISH))
    png = image_bytes(qr_image(PHISH), "PNG")
    for _ in range(40):
        for data, read in ((pdf, lambda d: pdf_links(d, "x.pdf", LinkLimits())),
                           (png, lambda d: qr_texts(d, LinkLimits()))):
            damaged = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            assert isinstance(read(bytes(damaged)), list)
