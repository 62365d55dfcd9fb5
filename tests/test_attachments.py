"""Attachment policy: extension lists from settings, magic bytes, zip directories without unpacking."""

from __future__ import annotations

import base64
import io
import shutil
import struct
import subprocess
import time
import zipfile
import zlib

import pytest

from milterguard.mail.archives import (MAX_NESTED, RAR4_SIGNATURE, RAR5_SIGNATURE, BadArchive, rar_listing,
                                  sevenzip_listing, zip_listing)
from milterguard.checks.attachments import declared_kind, magic_kind, zip_names
from milterguard.checks.mime import NamePolicy
from milterguard.config import load_config
from milterguard.engine.core import Engine
from milterguard.model import Connection, Transaction
from milterguard.mail.raw import split_message


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


# ------------------------------------------------------------------ archives in archives, RAR and 7z


def test_zip_inside_a_zip_is_looked_into_one_level(engine_with):
    inner = zipped([("invoice.pdf.exe", b"MZ" + b"\0" * 500)])
    deeper = zipped([("deep.zip", zipped([("buried.exe", b"MZ")]))])
    outer = zipped([("docs.zip", inner), ("more.zip", deeper), ("readme.txt", b"hello")])
    verdict = symbols(engine_with(), message_with("files.zip", outer))
    # more.zip holds only deep.zip, a name that is not dangerous: two levels down is not read.
    assert verdict.hit("MIME_ARCHIVE_EXEC").options == ["files.zip:docs.zip:invoice.pdf.exe"]
    assert "MIME_ARCHIVE_EXEC" not in symbols(engine_with("attachments.nested_max_bytes=0"),
                                              message_with("files.zip", outer)).symbols


def test_nested_zip_bomb_is_not_decompressed(engine_with):
    # The inner zip declares 64 MB once unpacked from the outer one: past nested_max_bytes, never opened.
    bomb = zipped([("zeros.bin", b"\0" * (64 * 1024 * 1024)), ("late.exe", b"MZ")], zipfile.ZIP_STORED)
    outer = zipped([("inner.zip", bomb)])
    t0 = time.perf_counter()
    listing = zip_listing(outer, 1000, 1024 * 1024)
    assert time.perf_counter() - t0 < 1.0
    assert listing.names == ["inner.zip"] and listing.nested == []
    # Within the limit it is read; nested entries are bounded like the outer ones.
    many = zipped([("inner.zip", zipped([(f"f{i}.txt", b"") for i in range(30)] + [("late.exe", b"MZ")]))])
    (name, inner), = zip_listing(many, 20, 1024 * 1024).nested
    assert name == "inner.zip" and len(inner.names) == 20 and inner.cut


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_LZMA])
def test_nested_zip_with_a_broken_stream_is_not_listed(method):
    # zlib.error and lzma.LZMAError are not OSError: they once escaped as CHECK_ERROR.
    inner = zipped([("x.exe", b"MZ" + bytes(range(256)) * 8)])
    outer = bytearray(zipped([("inner.zip", inner), ("a.txt", b"hello")], method))
    start = outer.index(b"PK\x03\x04") + 30 + len("inner.zip")
    outer[start + 20:start + 60] = b"\xff" * 40  # inside the compressed member, past LZMA's properties
    listing = zip_listing(bytes(outer), 1000, 1024 * 1024)
    assert listing.names == ["inner.zip", "a.txt"] and listing.nested == []


def test_at_most_ten_nested_zips_are_opened():
    outer = zipped([(f"part{i}.zip", zipped([(f"x{i}.exe", b"MZ")])) for i in range(15)])
    assert len(zip_listing(outer, 1000, 1024 * 1024).nested) == MAX_NESTED == 10


# RAR 4 (rarlab technote.txt): blocks of HEAD_CRC(2) HEAD_TYPE(1) HEAD_FLAGS(2) HEAD_SIZE(2) ...,
# HEAD_CRC being the low 16 bits of the CRC32 of the header from HEAD_TYPE on.
def rar4_block(kind: int, flags: int, body: bytes = b"", data: bytes = b"") -> bytes:
    head = struct.pack("<BHH", kind, flags, 7 + len(body)) + body
    return struct.pack("<H", zlib.crc32(head) & 0xFFFF) + head + data


def rar4(files, encrypted_headers=False, encrypted_files=False) -> bytes:
    out = RAR4_SIGNATURE + rar4_block(0x73, 0x0080 if encrypted_headers else 0, b"\0" * 6)
    if encrypted_headers:
        return out + b"\x5a\x17" * 64  # salt and encrypted blocks: nothing readable follows
    for name, data in files:
        body = struct.pack("<IIBIIBBHI", len(data), len(data), 2, zlib.crc32(data), 0x5A210000, 29, 0x30,
                           len(name), 0x20) + name.encode()
        out += rar4_block(0x74, 0x8000 | (0x0004 if encrypted_files else 0), body, data)
    return out + rar4_block(0x7B, 0x4000)


# RAR 5.0 archive format: blocks of CRC32(4) HEADER_SIZE(vint) TYPE(vint) FLAGS(vint) [EXTRA_SIZE] [DATA_SIZE] ...
def vint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def rar5_block(kind: int, body: bytes, extra: bytes = b"", data: bytes = b"") -> bytes:
    flags = (0x0001 if extra else 0) | (0x0002 if data else 0)
    fields = vint(kind) + vint(flags) + (vint(len(extra)) if extra else b"") + (vint(len(data)) if data else b"") \
        + body + extra
    head = vint(len(fields)) + fields
    return struct.pack("<I", zlib.crc32(head)) + head + data


def rar5(files, encrypted_headers=False, encrypted_files=False) -> bytes:
    out = RAR5_SIGNATURE
    if encrypted_headers:  # archive encryption header: version, flags, KDF count, salt
        return out + rar5_block(4, vint(0) + vint(0) + b"\x0f" + b"\xa5" * 16) + b"\x3c" * 96
    out += rar5_block(1, vint(0))
    for name, data in files:
        body = vint(0x0004) + vint(len(data)) + vint(0x20) + struct.pack("<I", zlib.crc32(data)) + vint(0) + vint(1) \
            + vint(len(name)) + name.encode()
        # File encryption record: version, flags, KDF count, salt, IV.
        record = vint(0x01) + vint(0) + vint(0) + b"\x0f" + b"\x11" * 32
        extra = vint(len(record)) + record if encrypted_files else b""
        out += rar5_block(2, body, extra, data)
    return out + rar5_block(5, vint(0))


@pytest.mark.parametrize("build", [rar4, rar5], ids=["rar4", "rar5"])
def test_rar_names_and_encryption_from_headers(build, engine_with):
    plain = build([("notes.txt", b"the notes"), ("tools/setup.scr", b"MZ" + b"\0" * 64)])
    listing = rar_listing(plain, 1000)
    assert listing.names == ["notes.txt", "tools/setup.scr"] and not listing.encrypted
    verdict = symbols(engine_with(), message_with("files.rar", plain, "application/vnd.rar"))
    assert verdict.hit("MIME_ARCHIVE_EXEC").options == ["files.rar:setup.scr"]
    assert "MIME_ARCHIVE_ENCRYPTED" not in verdict.symbols and "MIME_TYPE_MISMATCH" not in verdict.symbols

    locked = build([("report.doc", b"x" * 40)], encrypted_files=True)
    assert rar_listing(locked, 1000).encrypted
    verdict = symbols(engine_with(), message_with("report.rar", locked, "application/vnd.rar"))
    assert verdict.hit("MIME_ARCHIVE_ENCRYPTED").options == ["report.rar"]

    hidden = build([], encrypted_headers=True)
    assert rar_listing(hidden, 1000).encrypted and rar_listing(hidden, 1000).names == []
    verdict = symbols(engine_with(), message_with("scan.rar", hidden, "application/octet-stream"))
    assert verdict.hit("MIME_ARCHIVE_ENCRYPTED").options == ["scan.rar"]


@pytest.mark.parametrize("build", [rar4, rar5], ids=["rar4", "rar5"])
def test_rar_walk_is_bounded_and_survives_truncation(build):
    many = build([(f"f{i}.txt", b"") for i in range(30)] + [("late.exe", b"MZ")])
    listing = rar_listing(many, 20)
    assert len(listing.names) == 20 and listing.cut
    for cut in range(len(RAR5_SIGNATURE), len(many)):
        try:
            rar_listing(many[:cut], 1000)
        except BadArchive:
            pass  # a broken archive is ignored by the check; anything else would be a bug


def seven_zip(tmp_path, *options: str) -> bytes:
    if shutil.which("7zz") is None:
        pytest.skip("7zz (Debian package 7zip) is not installed")
    (tmp_path / "report.txt").write_text("the report\n" * 20)
    (tmp_path / "run.exe").write_bytes(b"MZ" + bytes(range(256)))
    target = tmp_path / f"out{len(list(tmp_path.glob('*.7z')))}.7z"
    subprocess.run(["7zz", "a", "-bso0", "-bsp0", *options, str(target), str(tmp_path / "report.txt"),
                    str(tmp_path / "run.exe")], check=True, timeout=60)
    return target.read_bytes()


@pytest.mark.parametrize("options, encrypted", [
    (["-pSECRET", "-mhe=on"], True),  # names and files encrypted: the end header is AES-encoded
    (["-pSECRET"], True),  # files encrypted under an LZMA-compressed end header (7-Zip's default)
    (["-pSECRET", "-mhc=off"], True),  # files encrypted under a plain end header
    ([], False),
    (["-mhc=off"], False),
], ids=["encrypted_header", "encrypted_files", "encrypted_files_plain_header", "plain", "plain_header"])
def test_7z_encryption_from_its_headers(tmp_path, engine_with, options, encrypted):
    archive = seven_zip(tmp_path, *options)
    assert sevenzip_listing(archive).encrypted is encrypted
    verdict = symbols(engine_with(), message_with("report.7z", archive, "application/x-7z-compressed"))
    assert ("MIME_ARCHIVE_ENCRYPTED" in verdict.symbols) is encrypted
    assert "CHECK_ERROR" not in verdict.symbols


def test_encrypted_zip_inside_a_zip(tmp_path, engine_with):
    if shutil.which("7zz") is None:
        pytest.skip("7zz (Debian package 7zip) is not installed")
    (tmp_path / "salary.xlsx").write_bytes(b"PK\x05\x06" + b"\0" * 18)
    subprocess.run(["7zz", "a", "-bso0", "-bsp0", "-tzip", "-pSECRET", str(tmp_path / "locked.zip"),
                    str(tmp_path / "salary.xlsx")], check=True, timeout=60)
    outer = zipped([("locked.zip", (tmp_path / "locked.zip").read_bytes())])
    verdict = symbols(engine_with(), message_with("files.zip", outer))
    assert verdict.hit("MIME_ARCHIVE_ENCRYPTED").options == ["files.zip:locked.zip"]
