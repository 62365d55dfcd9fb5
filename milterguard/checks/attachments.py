"""What attachments really are: magic bytes against the declared type, and archives.

Archives are judged by their directories and headers alone (milterguard/mail/archives.py):
zip central directories, and one level down those of the small zips a zip holds;
RAR 4 and 5 block headers; the 7z end header.  Nothing large is decompressed, so a
zip bomb costs no more than its directory, and at most
attachments.archive_max_entries names are read per archive.  The extension lists
are the ones `attachment_names` (checks/mime.py) uses.
"""

from __future__ import annotations

import re
import zipfile

from milterguard.mail.attached import is_markup_attachment
from milterguard.mail.archives import BadArchive, Listing, rar_listing, sevenzip_listing, zip_listing
from milterguard.checks.mime import name_policy
from milterguard.checks.registry import check
from milterguard.model import Hits, Stage

# Leading bytes of the file kinds a declared type is compared with: (kind, offset, magic).
_MAGIC = (
    ("exe", 0, b"MZ"),
    ("elf", 0, b"\x7fELF"),
    ("zip", 0, b"PK\x03\x04"),
    ("zip", 0, b"PK\x05\x06"),  # an empty zip
    ("ole", 0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"),  # doc, xls, ppt, msg, msi
    ("rar", 0, b"Rar!\x1a\x07"),
    ("7z", 0, b"7z\xbc\xaf\x27\x1c"),
    ("gzip", 0, b"\x1f\x8b"),
    ("png", 0, b"\x89PNG\r\n\x1a\n"),
    ("jpeg", 0, b"\xff\xd8\xff"),
    ("gif", 0, b"GIF8"),
    ("iso", 0x8001, b"CD001"),
)
# What a declared extension or content type says the bytes must be.
_EXT_KIND = {
    "pdf": "pdf", "png": "png", "jpg": "jpeg", "jpeg": "jpeg", "gif": "gif",
    "zip": "zip", "docx": "zip", "xlsx": "zip", "pptx": "zip", "odt": "zip", "ods": "zip", "jar": "zip",
    "doc": "ole", "xls": "ole", "ppt": "ole", "msg": "ole",
    "rar": "rar", "7z": "7z", "gz": "gzip", "tgz": "gzip", "exe": "exe", "dll": "exe", "scr": "exe",
    "iso": "iso",
}
_TYPE_KIND = {
    "application/pdf": "pdf", "image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "image/gif": "gif",
    "application/zip": "zip", "application/x-zip-compressed": "zip", "application/msword": "ole",
    "application/vnd.ms-excel": "ole", "application/x-rar-compressed": "rar", "application/vnd.rar": "rar",
    "application/x-7z-compressed": "7z", "application/gzip": "gzip", "application/x-gzip": "gzip",
}
_EXECUTABLE = frozenset({"exe", "elf"})
# Declarations of a zip archive as such; Office and Java files are zips too, but their
# entries are their own parts (word/document.xml), not files for the recipient to open.
_PLAIN_ZIP = frozenset({".zip", "application/zip", "application/x-zip-compressed"})


def magic_kind(data: bytes) -> str | None:
    """The file kind the leading bytes of DATA show, or None for one not known here."""
    for kind, offset, magic in _MAGIC:
        if data[offset:offset + len(magic)] == magic:
            return kind
    # PDF readers accept the header anywhere in the first KB.
    if b"%PDF-" in data[:1024]:
        return "pdf"
    return None


def declared_kind(filename: str, content_type: str) -> tuple[str, str] | None:
    """(kind, what declared it) from the file name's extension, else from a specific content type."""
    ext = filename.lower().rstrip(" .").rpartition(".")[2] if "." in filename else ""
    if ext in _EXT_KIND:
        return _EXT_KIND[ext], f".{ext}"
    kind = _TYPE_KIND.get(content_type.lower())
    return (kind, content_type.lower()) if kind else None


def zip_names(data: bytes, max_entries: int) -> tuple[list[str], bool, bool]:
    """(entry names, any entry encrypted, whether the directory was cut at max_entries).

    Reads the central directory only; raises zipfile.BadZipFile on a broken archive.
    """
    try:
        listing = zip_listing(data, max_entries)
    except BadArchive as exc:
        raise zipfile.BadZipFile(str(exc)) from None
    return listing.names, listing.encrypted, listing.cut


@check(stage=Stage.EOM, emits=("MIME_TYPE_MISMATCH", "MIME_ARCHIVE_EXEC", "MIME_ARCHIVE_ENCRYPTED"), priority=25)
def archive_contents(scan, hits: Hits) -> None:
    """Attachments whose bytes contradict their declared type, and what zip archives hold."""
    config = scan.config
    policy = name_policy(config)
    max_bytes = config["attachments.archive_max_bytes"]
    max_entries = config["attachments.archive_max_entries"]
    nested_max = config["attachments.nested_max_bytes"]
    for part in scan.message.attachments:
        data = part.payload
        if not data:
            continue
        name = (part.filename or "").strip()
        actual = magic_kind(data[:0x8010])
        declared = declared_kind(name, part.content_type)
        if actual in _EXECUTABLE and not (name and policy.judge(name.lower())):
            # Program bytes under a name that does not say so (report.dat, photo.jpg, no name).
            shown = declared[1] if declared else (f".{name.rpartition('.')[2].lower()}" if "." in name else "no extension")
            hits.add("MIME_TYPE_MISMATCH", f"{shown} is {actual}", where="attachment content",
                     text=f"{name or part.content_type} starts with the bytes of an executable")
        elif actual and declared and actual != declared[0]:
            # A .docx is a zip and a .msi an OLE file: only a different kind contradicts.
            hits.add("MIME_TYPE_MISMATCH", f"{declared[1]} is {actual}", where="attachment content",
                     text=f"{name or part.content_type}: declared {declared[0]}, bytes say {actual}")
        if len(data) > max_bytes:
            continue
        if actual == "zip" and (declared is None or declared[1] in _PLAIN_ZIP):
            _judge_archive(name, "zip", lambda: zip_listing(data, max_entries, nested_max), policy, hits)
        elif actual == "rar":
            _judge_archive(name, "rar", lambda: rar_listing(data, max_entries), policy, hits)
        elif actual == "7z":
            _judge_archive(name, "7z", lambda: sevenzip_listing(data), policy, hits)


def _judge_archive(name: str, kind: str, read, policy, hits: Hits) -> None:
    try:
        listing = read()
    except BadArchive:
        return  # a broken archive cannot be opened by the recipient either
    shown = name or kind
    _judge_listing(shown, listing, policy, hits)
    for inner_name, inner in listing.nested:
        _judge_listing(f"{shown}:{inner_name.replace(chr(92), '/').rpartition('/')[2]}", inner, policy, hits)


def _judge_listing(shown: str, listing: Listing, policy, hits: Hits) -> None:
    if listing.encrypted:
        hits.add("MIME_ARCHIVE_ENCRYPTED", shown, where="attachment content",
                 text=f"{shown}: password-protected {'names' if not listing.names else 'entries'}, "
                      "which no scanner can look into")
    for inner in listing.names:
        base = inner.replace("\\", "/").rpartition("/")[2].lower()
        judged = [s for s in policy.judge(base) if s in ("MIME_EXEC_ATTACHMENT", "MIME_ATTACH_OFFICE_MACRO")]
        if judged:
            hits.add("MIME_ARCHIVE_EXEC", f"{shown}:{base}", where="archive entry", text=f"{inner} in {shown}")


# What makes an attached web page or SVG image act rather than show: it runs in the
# recipient's browser from a local file, where no web filter saw it.
_ACTIVE_MAX = 1024 * 1024
_FORM = re.compile(r"(?i)<form\b|<input\b[^<>]*\btype\s*=\s*[\"']?password")
_SCRIPT = re.compile(r"(?i)<script\b|<[a-z][^<>]*\son[a-z]{3,20}\s*=|javascript:")
_REDIRECT = re.compile(r"(?i)<meta\b[^<>]*http-equiv\s*=\s*[\"']?refresh|\b(?:window|document|top|self|parent)"
                       r"\s*\.\s*location\b|\blocation\s*\.\s*(?:href|replace|assign)\b")
_OBFUSCATED = re.compile(r"(?i)\batob\s*\(|\bunescape\s*\(|\beval\s*\(|fromCharCode|\bdecodeURIComponent\s*\(\s*escape")
_SVG_ACTIVE = re.compile(r"(?i)<script\b|<foreignObject\b|\son[a-z]{3,20}\s*=|javascript:|<iframe\b|<embed\b")


@check(stage=Stage.EOM, emits=("MIME_HTML_ATTACH_FORM", "MIME_HTML_ATTACH_SCRIPT", "MIME_HTML_ATTACH_REDIRECT",
                               "MIME_HTML_ATTACH_OBFUSCATED", "MIME_SVG_ACTIVE"), priority=25)
def active_attachments(scan, hits: Hits) -> None:
    """Attached web pages and SVG images that ask for input, run scripts or send the reader elsewhere."""
    for part in scan.message.attachments:
        kind = is_markup_attachment(part)
        if kind is None or not part.payload:
            continue
        name = part.filename or part.content_type
        text = part.text if part.text is not None else part.payload[:_ACTIVE_MAX].decode("utf-8", "replace")
        text = text[:_ACTIVE_MAX]
        if kind == "svg":
            m = _SVG_ACTIVE.search(text)
            if m:
                hits.add("MIME_SVG_ACTIVE", name, where="attachment content", text=f"{name}: {m.group(0)}")
            if (m := _REDIRECT.search(text)):
                hits.add("MIME_HTML_ATTACH_REDIRECT", name, where="attachment content", text=f"{name}: {m.group(0)}")
            continue
        for symbol, pattern in (("MIME_HTML_ATTACH_FORM", _FORM), ("MIME_HTML_ATTACH_SCRIPT", _SCRIPT),
                                ("MIME_HTML_ATTACH_REDIRECT", _REDIRECT), ("MIME_HTML_ATTACH_OBFUSCATED", _OBFUSCATED)):
            m = pattern.search(text)
            if m:
                hits.add(symbol, name, where="attachment content", text=f"{name}: {m.group(0)[:60]}")


@check(stage=Stage.EOM, emits=("PDF_LINK", "QR_CODE_URL"), priority=25)
def attachment_links(scan, hits: Hits) -> None:
    """Links that a PDF attachment carries, and URLs in QR codes of images (mail/attached.py)."""
    pdf = qr = None
    for link in scan.message.attached_links:
        if link.source == "pdf" and pdf is None:
            pdf = link
        elif link.source == "qr" and qr is None and "://" in link.url[:12]:
            qr = link
    if pdf is not None:
        hits.add("PDF_LINK", pdf.url[:60], where=pdf.where, text=pdf.url[:120])
    if qr is not None:
        hits.add("QR_CODE_URL", qr.url[:60], where=qr.where, text=qr.url[:120])
