"""QR codes drawn in a PDF as vector paths (`x y w h re f`), found by rendering the page with the real
pdftoppm (poppler-utils, installed by tests/run.sh). The PDFs are written by hand (support/qrmail.py)
from the qrcode library's module matrix."""

from __future__ import annotations

import logging
import time

import pytest

from milterguard.config import load_config
from milterguard.engine.core import Engine
from milterguard.mail import pdfrender
from milterguard.mail.attached import LinkLimits, pdf_links
from milterguard.mail.raw import split_message
from milterguard.model import Connection, Transaction

pytest.importorskip("qrcode")
from support.qrmail import LURE, TEXT, message_with_pdf, pdf, qr_paths  # noqa: E402



def renders(call) -> tuple[int, object]:
    before = pdfrender.stats["rendered"]
    result = call()
    return pdfrender.stats["rendered"] - before, result


def test_a_qr_code_drawn_with_rectangles_is_found():
    count, links = renders(lambda: pdf_links(pdf([TEXT + qr_paths(LURE)]), "share.pdf", LinkLimits()))
    assert [(link.url, link.source, link.where) for link in links] == [(LURE, "qr", "share.pdf page 1 (drawn)")]
    assert count == 1


def test_a_small_qr_code_is_found():
    # 1.5 points a module: an inch-wide code on an A4 page, as an invoice prints it.
    links = pdf_links(pdf([TEXT + qr_paths(LURE, module=1.5)]), "invoice.pdf", LinkLimits())
    assert [link.url for link in links] == [LURE]
    # An uncompressed content stream, filled with the even-odd rule.
    links = pdf_links(pdf([TEXT + qr_paths(LURE, fill="f*")], compress=False), "invoice.pdf", LinkLimits())
    assert [link.url for link in links] == [LURE]


def test_pages_that_draw_few_paths_are_not_rendered():
    text_only = pdf([TEXT * 40])
    # A hundred rectangles that only clip (re W n) are not a drawing; nor a few framed boxes.
    clips = pdf([TEXT + b"0 0 595 842 re W n\n" * 100 + b"10 10 100 100 re f 20 20 50 50 re S\n"])
    for data in (text_only, clips):
        count, links = renders(lambda: pdf_links(data, "letter.pdf", LinkLimits()))
        assert (count, links) == (0, [])
    assert pdfrender.filled_subpaths(b"0 0 595 842 re W n\n" * 100) == 0
    assert pdfrender.filled_subpaths(qr_paths(LURE)) > pdfrender.MIN_PATHS


def test_rendering_is_bounded_by_the_settings():
    data = pdf([TEXT, TEXT + qr_paths(LURE), TEXT + qr_paths(LURE)])
    assert renders(lambda: pdf_links(data, "x.pdf", LinkLimits(pdf_render=False))) == (0, [])
    # Only the first pdf_render_pages pages may be rendered: the code on page 2 needs 2.
    assert renders(lambda: pdf_links(data, "x.pdf", LinkLimits(pdf_render_pages=1))) == (0, [])
    count, links = renders(lambda: pdf_links(data, "x.pdf", LinkLimits(pdf_render_pages=2)))
    assert count == 1 and [link.where for link in links] == ["x.pdf page 2 (drawn)"]


def test_a_page_claiming_a_huge_size_is_rendered_small():
    huge = pdf([qr_paths(LURE, x0=5000, y0=5000, module=2000)], size=(100000, 100000))
    image = pdfrender.render_page(huge, 1, 800, 512 * 1024 * 1024, time.monotonic() + 20)
    assert image is not None and max(image.size) <= 800
    # Read at that size: a code that fills the page is found.
    assert [link.url for link in pdf_links(huge, "big.pdf", LinkLimits(seconds=20))] == [LURE]


@pytest.mark.parametrize("case", ["truncated", "many pages", "endless content", "no memory"])
def test_hostile_pdfs_give_no_link_and_do_not_raise(case):
    drawn = TEXT + qr_paths(LURE)
    limits = LinkLimits()
    if case == "truncated":
        whole = pdf([drawn])
        data = whole[: len(whole) * 2 // 3]
    elif case == "many pages":
        data = pdf([TEXT], repeat=200_000, count=10_000_000)
    elif case == "endless content":
        # 60 MB of filled rectangles, 100 KB compressed: far more than the page's time allows to draw.
        data = pdf([drawn + b"0 0 1 1 re f\n" * 5_000_000])
        limits = LinkLimits(seconds=0.5)
    else:
        data = pdf([drawn])
        limits = LinkLimits(pdf_render_memory=4 * 1024 * 1024)
    failed, rendered = pdfrender.stats["failed"], pdfrender.stats["rendered"]
    assert pdf_links(data, "evil.pdf", limits) == []
    if case in ("endless content", "no memory"):  # rendered, and the renderer killed or failed
        assert pdfrender.stats["failed"] == failed + 1
    else:
        assert pdfrender.stats["rendered"] == rendered


def verdict_of(engine: Engine, raw: bytes):
    headers, body = split_message(raw)
    txn = Transaction(mail_from="docs@example.net", rcpts=["bob@example.org"], headers=headers, body=body,
                      body_size=len(body))
    return engine.evaluate(Connection(client_ip="192.0.2.1", client_name="[192.0.2.1]", helo="mx.example.net"), txn)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine.load(load_config(etc_dir=tmp_path_factory.mktemp("etc"), sets=["dns.enabled=false"]), strict=True)


def test_the_drawn_code_goes_through_the_url_checks(engine):
    verdict = verdict_of(engine, message_with_pdf(pdf([TEXT + qr_paths(LURE)])))
    assert {"QR_CODE_URL", "URI_FREE_WEBHOST"} <= set(verdict.symbols)
    assert "shared.pdf page 1 (drawn)" in verdict.hit("QR_CODE_URL").where


def test_without_pdftoppm_it_is_logged_once_and_the_mail_still_judged(engine, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH where no pdftoppm is installed
    monkeypatch.setattr(pdfrender, "_checked", {})
    raw = message_with_pdf(pdf([TEXT + qr_paths(LURE)]))
    with caplog.at_level(logging.WARNING, logger="milterguard.mail.pdfrender"):
        first, second = verdict_of(engine, raw), verdict_of(engine, raw)
    warned = [r for r in caplog.records if r.name == "milterguard.mail.pdfrender"]
    assert len(warned) == 1 and "poppler-utils" in warned[0].getMessage()
    for verdict in (first, second):
        assert verdict.action and "QR_CODE_URL" not in verdict.symbols
    monkeypatch.undo()
    pdfrender._checked.clear()


@pytest.mark.postfix
def test_through_postfix_and_the_milter(postfix_factory, milterguard_factory, sink):
    """The filter as Postfix runs it finds the drawn code: the same engine, pdftoppm from its PATH."""
    mg = milterguard_factory(workers=1, sets={"dns.enabled": False})
    pf = postfix_factory(mg)
    assert pf.send(message_with_pdf(pdf([TEXT + qr_paths(LURE)]))).code == 250
    verdict = mg.verdict_for("<drawn@example.net>")
    assert verdict.has("QR_CODE_URL") and verdict.has("URI_FREE_WEBHOST")
