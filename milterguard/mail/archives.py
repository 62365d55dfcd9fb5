"""What an archive holds, read from its directory and headers without unpacking.

- zip: the central directory (names, the encryption flag of each entry);
  a zip stored inside a zip is opened one level down when its declared size
  is small (`nested_max_bytes`): only then is anything decompressed, and
  never more than that many bytes.
- RAR 4 and RAR 5: the block headers, walked from the start of the file:
  the names of files, and their encryption (RAR 4: the archive header's
  MHD_PASSWORD flag, a file header's LHD_PASSWORD flag; RAR 5: an archive
  encryption header, or a file header's encryption record).  An archive whose
  headers are encrypted shows no names at all.
- 7z: the signature header points at the end header; an end header that is
  encoded with the AES-256 coder (06 F1 07 01) means the names are encrypted
  (`7z -mhe=on`).  Files encrypted under a plain header show the same coder
  in the main streams; a header that 7-Zip only compressed (LZMA, its
  default) is unpacked to see them when it declares at most 64 KB.

Every walk is bounded by `max_entries` and by the bytes at hand: a header that
points outside the data ends the walk.  Formats: RAR 4 and 5 technical notes
of rarlab (`technote.txt`, "RAR 5.0 archive format"), 7-Zip's `7zFormat.txt`.
"""

from __future__ import annotations

import io
import lzma
import struct
import zipfile
import zlib
from dataclasses import dataclass, field

RAR4_SIGNATURE = b"Rar!\x1a\x07\x00"
RAR5_SIGNATURE = b"Rar!\x1a\x07\x01\x00"
SEVENZIP_SIGNATURE = b"7z\xbc\xaf\x27\x1c"
MAX_NESTED = 10  # zips inside one zip that are opened
_AES_CODER = b"\x06\xf1\x07\x01"  # 7zFormat.txt: 06F10701 - AES-256 + SHA-256
_LZMA_CODER = b"\x03\x01\x01"  # 030101 - LZMA


class BadArchive(ValueError):
    """The archive's directory or headers do not parse."""


@dataclass
class Listing:
    """What an archive's directory shows."""

    kind: str  # zip, rar, 7z
    names: list[str] = field(default_factory=list)
    encrypted: bool = False  # an entry, or the directory itself, is password-protected
    cut: bool = False  # more entries than were read
    nested: list[tuple[str, "Listing"]] = field(default_factory=list)  # zips in a zip, one level


# ------------------------------------------------------------------ zip


def zip_listing(data: bytes, max_entries: int, nested_max_bytes: int = 0) -> Listing:
    """The central directory of a zip, and of the zips in it whose declared size is at most
    NESTED_MAX_BYTES (0: none), one level down.  Raises BadArchive on a broken archive."""
    archive, infos, cut = _zip_directory(data, max_entries)
    listing = Listing("zip", [i.filename for i in infos], any(i.flag_bits & 0x1 for i in infos), cut)
    if not nested_max_bytes:
        return listing
    for info in infos:
        if len(listing.nested) >= MAX_NESTED:
            break
        if not info.filename.lower().endswith(".zip") or info.flag_bits & 0x1 or info.is_dir():
            continue
        if info.file_size > nested_max_bytes or info.compress_size > nested_max_bytes:
            continue
        try:
            with archive.open(info) as member:
                inner = member.read(nested_max_bytes + 1)  # a size field that lies still stops here
        except (zipfile.BadZipFile, NotImplementedError, EOFError, OSError, ValueError, RuntimeError,
                zlib.error, lzma.LZMAError):  # a broken deflate or LZMA stream raises its module's error
            continue  # an unsupported method or a broken member: nothing to list
        if len(inner) > nested_max_bytes:
            continue
        try:
            _inner_archive, inner_infos, inner_cut = _zip_directory(inner, max_entries)
        except BadArchive:
            continue
        listing.nested.append((info.filename, Listing("zip", [i.filename for i in inner_infos],
                                                      any(i.flag_bits & 0x1 for i in inner_infos), inner_cut)))
    return listing


def _zip_directory(data: bytes, max_entries: int):
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, struct.error, NotImplementedError,
            OSError) as exc:
        raise BadArchive(str(exc)) from None
    infos = archive.infolist()
    return archive, infos[:max_entries], len(infos) > max_entries


# ------------------------------------------------------------------ RAR


def rar_listing(data: bytes, max_entries: int) -> Listing:
    """File names and encryption of a RAR 4 or RAR 5 archive.  Raises BadArchive."""
    try:
        if data.startswith(RAR5_SIGNATURE):
            return _rar5(data, max_entries)
        if data.startswith(RAR4_SIGNATURE):
            return _rar4(data, max_entries)
    except (struct.error, IndexError):
        raise BadArchive("RAR header past the end") from None
    raise BadArchive("no RAR signature")


def _rar4(data: bytes, max_entries: int) -> Listing:
    # technote.txt: each block is HEAD_CRC(2) HEAD_TYPE(1) HEAD_FLAGS(2) HEAD_SIZE(2) [ADD_SIZE(4)].
    listing = Listing("rar")
    pos = len(RAR4_SIGNATURE)
    for _ in range(max_entries * 2 + 4):
        if pos + 7 > len(data):
            break
        _crc, kind, flags, size = struct.unpack_from("<HBHH", data, pos)
        if size < 7:
            raise BadArchive(f"RAR block of {size} bytes at {pos}")
        added = 0
        if kind == 0x73:  # MAIN_HEAD
            if flags & 0x0080:  # MHD_PASSWORD: the block headers are encrypted
                listing.encrypted = True
                return listing
        elif kind == 0x74:  # FILE_HEAD
            if pos + 32 > len(data):
                break
            # PACK_SIZE UNP_SIZE HOST_OS FILE_CRC FTIME UNP_VER METHOD NAME_SIZE ATTR
            added, _unp, _os, _fcrc, _time, _ver, _method, name_size, _attr = struct.unpack_from("<IIBIIBBHI", data, pos + 7)
            at = pos + 32
            if flags & 0x0100:  # LHD_LARGE: HIGH_PACK_SIZE and HIGH_UNP_SIZE follow
                added += struct.unpack_from("<I", data, at)[0] << 32
                at += 8
            name = data[at:at + name_size]
            if flags & 0x0200:  # LHD_UNICODE: the plain name, a zero byte, then the packed Unicode one
                name = name.split(b"\0", 1)[0]
            if len(listing.names) >= max_entries:
                listing.cut = True
                break
            listing.names.append(name.decode("utf-8", "replace"))
            if flags & 0x0004:  # LHD_PASSWORD
                listing.encrypted = True
        elif flags & 0x8000:  # LONG_BLOCK: ADD_SIZE bytes of data follow the header
            if pos + 11 > len(data):
                break
            added = struct.unpack_from("<I", data, pos + 7)[0]
        if kind == 0x7B:  # ENDARC_HEAD
            break
        pos += size + added
    return listing


def _vint(data: bytes, pos: int) -> tuple[int, int]:
    """RAR 5 variable-length integer at POS: (value, position after it)."""
    value = shift = 0
    for _ in range(10):
        if pos >= len(data):
            raise BadArchive("RAR 5 number past the end")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise BadArchive("RAR 5 number longer than 10 bytes")


def _rar5(data: bytes, max_entries: int) -> Listing:
    # RAR 5.0 archive format: each block is CRC32(4) HEADER_SIZE(vint) TYPE(vint) FLAGS(vint)
    # [EXTRA_SIZE(vint)] [DATA_SIZE(vint)] ..., the extra area at the end of the header.
    listing = Listing("rar")
    pos = len(RAR5_SIGNATURE)
    for _ in range(max_entries * 2 + 4):
        if pos + 5 > len(data):
            break
        size, start = _vint(data, pos + 4)
        end = start + size
        kind, at = _vint(data, start)
        flags, at = _vint(data, at)
        extra = packed = 0
        if flags & 0x0001:
            extra, at = _vint(data, at)
        if flags & 0x0002:
            packed, at = _vint(data, at)
        if end > len(data) or extra > size:
            break
        if kind == 4:  # archive encryption header: every header after it is encrypted
            listing.encrypted = True
            return listing
        if kind == 2:  # file header
            file_flags, at = _vint(data, at)
            _unpacked, at = _vint(data, at)
            _attributes, at = _vint(data, at)
            at += (4 if file_flags & 0x0002 else 0) + (4 if file_flags & 0x0004 else 0)  # mtime, data CRC32
            _compression, at = _vint(data, at)
            _host, at = _vint(data, at)
            name_size, at = _vint(data, at)
            if len(listing.names) >= max_entries:
                listing.cut = True
                break
            listing.names.append(data[at:at + name_size].decode("utf-8", "replace"))
            record = end - extra
            while record < end:  # extra records: SIZE(vint) TYPE(vint) DATA; type 1 is file encryption
                record_size, after = _vint(data, record)
                record_type, _ = _vint(data, after)
                if record_type == 0x01:
                    listing.encrypted = True
                if record_size == 0:
                    break
                record = after + record_size
        if kind == 5:  # end of archive
            break
        pos = end + packed
    return listing


# ------------------------------------------------------------------ 7z


def _number(data: bytes, pos: int) -> tuple[int, int]:
    """7zFormat.txt NUMBER at POS: (value, position after it)."""
    if pos >= len(data):
        raise BadArchive("7z number past the end")
    first = data[pos]
    mask = 0x80
    value = 0
    for i in range(8):
        if not first & mask:
            return value | ((first & (mask - 1)) << (8 * i)), pos + 1 + i
        if pos + 1 + i >= len(data):
            raise BadArchive("7z number past the end")
        value |= data[pos + 1 + i] << (8 * i)
        mask >>= 1
    return value, pos + 9


@dataclass
class _Streams:
    """A StreamsInfo of 7zFormat.txt, as far as telling encryption needs."""

    pack_pos: int = 0
    pack_sizes: list[int] = field(default_factory=list)
    coders: list[tuple[bytes, bytes]] = field(default_factory=list)  # (coder ID, properties), every folder's
    unpack_sizes: list[int] = field(default_factory=list)


def _streams(data: bytes, pos: int) -> _Streams:
    """The StreamsInfo at POS: pack info, the folders' coders and their unpacked sizes."""
    found = _Streams()
    if data[pos] == 0x06:  # kPackInfo: PackPos NumPackStreams [kSize sizes] [kCRC ...] kEnd
        found.pack_pos, pos = _number(data, pos + 1)
        count, pos = _number(data, pos)
        if data[pos] == 0x09:
            pos += 1
            for _ in range(min(count, 4096)):
                size, pos = _number(data, pos)
                found.pack_sizes.append(size)
        if data[pos] == 0x0A:  # kCRC: AllAreDefined [bit field], then a CRC32 per defined stream
            every = data[pos + 1]
            pos += 2
            defined = count
            if not every:
                defined = sum(bin(b).count("1") for b in data[pos:pos + (count + 7) // 8])
                pos += (count + 7) // 8
            pos += 4 * defined
        if data[pos] != 0x00:
            return found
        pos += 1
    if data[pos] != 0x07 or data[pos + 1] != 0x0B:  # kUnPackInfo kFolder
        return found
    folders, pos = _number(data, pos + 2)
    if data[pos] != 0:  # External: folders stored elsewhere
        return found
    pos += 1
    outs_all = 0
    for _ in range(min(folders, 4096)):
        coders, pos = _number(data, pos)
        outs_total = ins_total = 0
        for _ in range(min(coders, 64)):
            flag = data[pos]
            id_size = flag & 0x0F
            coder = bytes(data[pos + 1:pos + 1 + id_size])
            pos += 1 + id_size
            ins = outs = 1
            if flag & 0x10:
                ins, pos = _number(data, pos)
                outs, pos = _number(data, pos)
            props = b""
            if flag & 0x20:
                length, pos = _number(data, pos)
                props = bytes(data[pos:pos + length])
                pos += length
            found.coders.append((coder, props))
            ins_total += ins
            outs_total += outs
        for _ in range(max(outs_total - 1, 0)):  # bind pairs: InIndex OutIndex
            _in, pos = _number(data, pos)
            _out, pos = _number(data, pos)
        packed = ins_total - max(outs_total - 1, 0)
        for _ in range(packed if packed > 1 else 0):
            _index, pos = _number(data, pos)
        outs_all += outs_total
    if data[pos] == 0x0C:  # kCodersUnPackSize: one per out stream of every folder
        pos += 1
        for _ in range(min(outs_all, 4096)):
            size, pos = _number(data, pos)
            found.unpack_sizes.append(size)
    return found


def _unpack_header(data: bytes, packed: _Streams, max_bytes: int) -> bytes | None:
    """The end header that an LZMA-only encoded header packs, when it is at most MAX_BYTES."""
    if len(packed.coders) != 1 or packed.coders[0][0] != _LZMA_CODER or not packed.pack_sizes:
        return None
    size = packed.unpack_sizes[-1] if packed.unpack_sizes else max_bytes + 1
    if size > max_bytes:
        return None
    start = 32 + packed.pack_pos
    chunk = data[start:start + packed.pack_sizes[0]]
    try:
        decoder = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[
            lzma._decode_filter_properties(lzma.FILTER_LZMA1, packed.coders[0][1])])  # noqa: SLF001 - 5 props bytes
        return decoder.decompress(chunk, max_length=size)
    except (lzma.LZMAError, ValueError, TypeError):
        return None


def sevenzip_listing(data: bytes, max_header_bytes: int = 64 * 1024) -> Listing:
    """Whether a 7z archive's names or files are encrypted.  Raises BadArchive.

    An end header that 7-Zip compressed (with LZMA alone) is unpacked when it
    declares at most MAX_HEADER_BYTES, never more than that."""
    if not data.startswith(SEVENZIP_SIGNATURE) or len(data) < 32:
        raise BadArchive("no 7z signature")
    # Signature(6) Version(2) StartHeaderCRC(4) NextHeaderOffset(8) NextHeaderSize(8) NextHeaderCRC(4)
    offset, size = struct.unpack_from("<QQ", data, 12)
    start = 32 + offset
    if size == 0 or start >= len(data):
        return Listing("7z")  # empty, or the end header is not within the data
    header = data[start:start + min(size, 1 << 20)]
    listing = Listing("7z")
    try:
        if header[0] == 0x17:  # kEncodedHeader: StreamsInfo of the packed end header
            packed = _streams(header, 1)
            if any(coder == _AES_CODER for coder, _ in packed.coders):
                listing.encrypted = True  # the names themselves are encrypted (7z -mhe=on)
                return listing
            # Compressed only (7-Zip's default): unpack it when small, to see the files' coders.
            header = _unpack_header(data, packed, max_header_bytes) or b""
        if header[:2] == b"\x01\x04":  # kHeader kMainStreamsInfo
            listing.encrypted = any(coder == _AES_CODER for coder, _ in _streams(header, 2).coders)
    except (IndexError, struct.error):
        raise BadArchive("7z header past the end") from None
    return listing
