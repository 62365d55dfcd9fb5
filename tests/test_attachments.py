"""Attachment policy: extension lists from settings, magic bytes, zip directories without unpacking."""

from __future__ import annotations

import base64
import io
import time
import zipfile

import pytest

from milterguard.checks.attachments import declared_kind, magic_kind, zip_names
from milterguard.checks.mime import NamePolicy
from milterguard.config import load_config
from milterguard.engine.core import Engine
from milterguard.engine.model import Connection, Transaction
from milterguard.rawmail import split_message


def zipped(entries, compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buf.getvalue()


def message_with(filename: str, data: bytes, ctype: str = "application/zip") -> bytes:
    encoded = base64.encodebytes(data).decode()
    return (
        "From: Alice <alice@example.net>\nTo: bob@example.org\nSubject: files\n"
        "Date: Mon, 02 Sep 2002 10:00:00 +0000\nMessage-ID: <att@example.net>\nMIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="b1"\n\n--b1\nContent-Type: text/plain\n\nThe files.\n'
        f'--b1\nContent-Type: {ctype}\nContent-Disposition: attachment; filename="{filename}"\n'
        f"Content-Transfer-Encoding: base64\n\n{encoded}--b1--\n"
    ).encode()


@pytest.fixture(scope="module")
def engine_with(tmp_path_factory):
    cache = {}

    def get(*sets: str) -> Engine:
        if sets not in cache:
            cache[sets] = Engine.load(load_config(etc_dir=tmp_path_factory.mktemp("etc"), sets=list(sets)), strict=True)
        return cache[sets]

    return get


def symbols(engine: Engine, raw: bytes):
    headers, body = split_message(raw)
    txn = Transaction(mail_from="alice@example.net", rcpts=["bob@example.org"], headers=headers, body=body,
                      body_size=len(body))
    return engine.evaluate(Connection(client_ip="198.51.100.7"), txn)


def test_name_policy():
    policy = NamePolicy(["exe", "lnk"], ["xlsm"], ["pdf"])
    assert policy.judge("invoice.pdf.exe") == ["MIME_EXEC_ATTACHMENT", "MIME_DOUBLE_EXT"]
    assert policy.judge("invoice.pdf   .exe") == ["MIME_EXEC_ATTACHMENT", "MIME_DOUBLE_EXT"]
    assert policy.judge("setup.exe.") == ["MIME_EXEC_ATTACHMENT"]
    assert policy.judge("budget.xlsm") == ["MIME_ATTACH_OFFICE_MACRO"]
    assert policy.judge("report.pdf") == [] and policy.judge("README") == []


def test_magic_and_declared_kinds():
    assert magic_kind(b"MZ\x90\x00") == "exe"
    assert magic_kind(b"junk before %PDF-1.7") == "pdf"
    assert magic_kind(b"plain text") is None
    assert declared_kind("draft.DOCX", "application/octet-stream") == ("zip", ".docx")
    assert declared_kind("noext", "application/pdf") == ("pdf", "application/pdf")
    assert declared_kind("noext", "application/octet-stream") is None


def test_extension_lists_are_settings(engine_with):
    raw = message_with("tool.xyz", b"hello", ctype="application/octet-stream")
    assert "MIME_EXEC_ATTACHMENT" not in symbols(engine_with(), raw).symbols
    assert "MIME_EXEC_ATTACHMENT" in symbols(engine_with("attachments.dangerous_extensions=[xyz]"), raw).symbols


def test_zip_bomb_costs_only_its_directory(engine_with):
    # 200 MB of zeros in each of 20 entries: 4 GB once unpacked, about 4 MB packed.
    bomb = zipped([(f"part{i}.bin", b"\0" * (200 * 1024 * 1024 // 50)) for i in range(20)] + [("run.exe", b"MZ")])
    t0 = time.perf_counter()
    verdict = symbols(engine_with(), message_with("data.zip", bomb))
    assert time.perf_counter() - t0 < 2.0
    assert verdict.hit("MIME_ARCHIVE_EXEC").options == ["data.zip:run.exe"]


def test_entries_past_the_limit_are_not_read(engine_with):
    late = zipped([(f"f{i}.txt", b"") for i in range(50)] + [("late.exe", b"MZ")])
    assert "MIME_ARCHIVE_EXEC" in symbols(engine_with(), message_with("a.zip", late)).symbols
    assert "MIME_ARCHIVE_EXEC" not in symbols(engine_with("attachments.archive_max_entries=20"),
                                              message_with("a.zip", late)).symbols
    names, encrypted, cut = zip_names(late, 20)
    assert len(names) == 20 and cut and not encrypted


def test_large_archives_are_not_opened(engine_with):
    archive = zipped([("run.exe", b"MZ" + bytes(range(256)) * 40)], zipfile.ZIP_STORED)
    assert "MIME_ARCHIVE_EXEC" not in symbols(engine_with("attachments.archive_max_bytes=1K"),
                                              message_with("a.zip", archive)).symbols


def test_broken_zip_is_ignored(engine_with):
    verdict = symbols(engine_with(), message_with("a.zip", b"PK\x03\x04" + b"\xff" * 200))
    assert not {"MIME_ARCHIVE_EXEC", "MIME_ARCHIVE_ENCRYPTED", "CHECK_ERROR"} & set(verdict.symbols)
