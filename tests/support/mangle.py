"""Mangled mail for robustness tests: seeded mutations of real messages.

``mutate(raw, rng)`` returns ``(name, mutant)``: one mutation, chosen and
shaped by ``rng`` (a ``random.Random``), applied to the message ``raw``.
The same seed always gives the same mutant, so that a failure names the
seed and index that reproduce it.  ``MUTATORS`` maps each name to its
function ``fn(raw, rng) -> bytes``.

The mutations are those that real broken, hostile or careless mail shows:
truncation, flipped bytes, header lines without a colon, 8-bit and NUL
bytes in headers, broken and duplicated MIME boundaries, bogus charsets
and transfer encodings, huge header lines, deeply nested multiparts, zip
attachments with corrupt central directories, malformed DKIM-Signature,
ARC and Authentication-Results headers, and malformed URLs.
"""

from __future__ import annotations

import base64
import io
import random
import struct
import zipfile

from milterguard.mail.raw import strip_mbox_from


def split(raw: bytes) -> tuple[bytes, bytes, bytes]:
    """(header block, line ending, body); the header block has no final blank line."""
    raw = strip_mbox_from(raw)
    for sep, nl in ((b"\r\n\r\n", b"\r\n"), (b"\n\n", b"\n")):
        pos = raw.find(sep)
        if pos >= 0:
            return raw[:pos], nl, raw[pos + len(sep):]
    return raw.rstrip(b"\r\n"), b"\n", b""


def join(head: bytes, nl: bytes, body: bytes) -> bytes:
    return head + nl + nl + body


def header_lines(head: bytes, nl: bytes) -> list[bytes]:
    return head.split(nl) if head else []


def without(lines: list[bytes], drop: tuple[bytes, ...]) -> list[bytes]:
    """Header LINES without the fields (and their continuation lines) named in DROP (lower case)."""
    kept: list[bytes] = []
    skipping = False
    for line in lines:
        if line[:1] not in (b" ", b"\t"):
            skipping = line.split(b":", 1)[0].strip().lower() in drop
        if not skipping:
            kept.append(line)
    return kept


def with_headers(raw: bytes, extra: list[bytes], rng: random.Random, drop: tuple[bytes, ...] = ()) -> bytes:
    """RAW with EXTRA header lines inserted at random places, headers named in DROP removed."""
    head, nl, body = split(raw)
    lines = without(header_lines(head, nl), drop)
    # Insert only between header fields, never inside a folded one.
    starts = [i for i, line in enumerate(lines) if line[:1] not in (b" ", b"\t")] + [len(lines)]
    for line in extra:
        at = rng.choice(starts)
        lines.insert(at, line)
        starts = [i for i, ln in enumerate(lines) if ln[:1] not in (b" ", b"\t")] + [len(lines)]
    return join(nl.join(lines), nl, body)


def with_body(raw: bytes, content_type: bytes, body: bytes, extra: tuple[bytes, ...] = ()) -> bytes:
    """RAW's headers with a new Content-Type (and EXTRA lines) and BODY."""
    head, nl, _ = split(raw)
    lines = without(header_lines(head, nl), (b"content-type", b"content-transfer-encoding", b"mime-version"))
    lines += [b"MIME-Version: 1.0", b"Content-Type: " + content_type, *extra]
    return join(nl.join(lines), nl, body.replace(b"\n", nl) if nl != b"\n" else body)


# ------------------------------------------------------------ byte-level

def truncate(raw: bytes, rng: random.Random) -> bytes:
    return raw[: rng.randrange(len(raw) + 1)]


def flip_bytes(raw: bytes, rng: random.Random) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 40)):
        if data:
            data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def mixed_line_endings(raw: bytes, rng: random.Random) -> bytes:
    out = bytearray()
    for line in raw.split(b"\n"):
        out += line.rstrip(b"\r") + rng.choice([b"\n", b"\r\n", b"\r", b"\r\r\n", b"\n\r"])
    return bytes(out)


# ------------------------------------------------------------ headers

def header_without_colon(raw: bytes, rng: random.Random) -> bytes:
    junk = rng.choice([b"This is not a header", b"X-Broken-Header value", b"From nobody Mon Jan 1",
                       b">From: someone@example.com", b"\xff\xfe\x00garbage", b"Subject"])
    return with_headers(raw, [junk] * rng.randint(1, 3), rng)


_EIGHT_BIT = [b"\x00", b"\xff", b"\xc3\x28", b"\xe2\x82", b"\x80\x81\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
              b"\x1b$B", b"\x7f", b"\r", b"\xc0\xaf", b"\xef\xbb\xbf"]


def eight_bit_headers(raw: bytes, rng: random.Random) -> bytes:
    """8-bit and NUL bytes in the values (and names) of the headers the checks read."""
    head, nl, body = split(raw)
    lines = header_lines(head, nl)
    names = (b"from", b"to", b"cc", b"subject", b"reply-to", b"return-path", b"received", b"date", b"message-id",
             b"content-type", b"x-mailer", b"list-unsubscribe", b"sender", b"dkim-signature", b"content-disposition")
    for i, line in enumerate(lines):
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() in names and rng.random() < 0.6:
            pos = rng.randrange(len(value) + 1)
            lines[i] = name + b":" + value[:pos] + rng.choice(_EIGHT_BIT) * rng.randint(1, 4) + value[pos:]
    extra = [b"From: " + rng.choice(_EIGHT_BIT) + b" <a" + rng.choice(_EIGHT_BIT) + b"@ex\x00ample.com>",
             b"Subject: " + bytes(rng.randrange(256) for _ in range(rng.randint(1, 60))),
             b"X-" + rng.choice(_EIGHT_BIT) + b"Name: value",
             b"Reply-To: =?utf-8?b?" + base64.b64encode(b"\xff\xfe\x00") + b"?= <r\xc3\xa9@ex\xc3\xa4mple.com>"]
    return with_headers(join(nl.join(lines), nl, body), rng.sample(extra, rng.randint(1, len(extra))), rng)


def huge_header(raw: bytes, rng: random.Random) -> bytes:
    size = rng.choice([10_000, 100_000, 400_000])
    name = rng.choice([b"Subject", b"X-Junk", b"Received", b"To", b"References", b"From", b"Content-Type"])
    if name == b"To":
        value = b", ".join(b"user%d@example%d.com" % (i, i % 7) for i in range(size // 24))
    elif name == b"Content-Type":
        value = b"text/plain; " + b"; ".join(b"p%d=%s" % (i, b"x" * 20) for i in range(size // 28))
    elif name == b"Received":
        value = b"from " + b"a." * (size // 2) + b" ([10.0.0.1]) by mx; Mon, 1 Jan 2024 00:00:00 +0000"
    else:
        value = bytes(rng.choice(b"abcdefghij =?:<>@.\t") for _ in range(size))
    folded = rng.random() < 0.3
    if folded:
        value = b"\n\t".join(value[i:i + 70] for i in range(0, len(value), 70))
    return with_headers(raw, [name + b": " + value], rng)


def many_headers(raw: bytes, rng: random.Random) -> bytes:
    n = rng.choice([500, 3000])
    name = rng.choice([b"Received", b"X-Header", b"To", b"Authentication-Results", b"DKIM-Signature", b"From"])
    lines = [name + b": from h%d.example.net ([192.0.2.%d]) by mx; a=b" % (i, i % 256) for i in range(n)]
    return with_headers(raw, lines, rng)


def bogus_addresses(raw: bytes, rng: random.Random) -> bytes:
    """From/Return-Path/Reply-To values no parser should choke on (the Return-Path is MAIL FROM too)."""
    choices = [b"<>", b"<@>", b"a@", b"@b", b"a@b@c", b"\"unterminated <a@b.c>", b"a@xn--.com", b"a@xn--zz-.com",
               b"a@[300.1.1.1]", b"a@[IPv6:zzzz::1]", b"a@[IPv6:::1]", b"a@.", b"a@..example..com",
               b"a@" + b"x" * 300 + b".com", b"a@" + b"b." * 200 + b"com", b"=?x-bogus?Q?abc?= <a@b.example>",
               b"=?utf-8?B?####?= <a@b.example>", b"=?utf-8?Q?=ZZ?= <a@b.example>", b"(((((comment <a@b.example>",
               b"a@\xd0\xb0pple.com", b"a@xn--80ak6aa92e.com", b"Group: a@b.example, c@d.example;",
               b"<a@b.example", b"a@b.example>", b"a@-example-.com", b"a@example.c\x00m", b"<<a@b.example>>",
               b"a@\xe2\x80\x8bexample.com", b"\"\\\" <a@b.example>", b"a@exa_mple.com", b"a@127.0.0.1"]
    extra = []
    for name in rng.sample([b"From", b"Return-Path", b"Reply-To", b"Sender", b"To", b"Cc"], rng.randint(1, 4)):
        extra.append(name + b": " + rng.choice(choices))
    drop = tuple(line.split(b":")[0].lower() for line in extra if rng.random() < 0.7)
    return with_headers(raw, extra, rng, drop=drop)


def bogus_dates_and_received(raw: bytes, rng: random.Random) -> bytes:
    extra = [rng.choice([b"Date: Mon, 99 Foo 99999 25:61:61 +9999", b"Date: ", b"Date: 0", b"Date: -1",
                         b"Date: Tue, 31 Feb 2024 10:00:00 +0000", b"Date: Thu, 1 Jan 1970 00:00:00 -2400",
                         b"Date: Fri, 1 Jan 10000 00:00:00 +0000", b"Date: 99999999999999999999"]),
             rng.choice([b"Received: from [999.1.1.1] by mx", b"Received: from x ([IPv6:zzzz::1]) by y",
                         b"Received: from a (b [1.2.3.4.5]) by c; Mon, 99 Jan 2024", b"Received: ;",
                         b"Received: from a ([::ffff:999.0.0.1]) by b; " + b";" * 50,
                         b"Received: from a (b [256.256.256.256]) by c with ESMTP id X; Sat, 1 Jan 1 1:1:1 +0000"]),
             rng.choice([b"Message-ID: <>", b"Message-ID: <<<@@@>>>", b"Message-ID: " + b"<" * 1000,
                         b"Message-ID: <a@\xff\xfe>", b"X-Mailer: \x00"])]
    return with_headers(raw, extra, rng, drop=(b"date",) if rng.random() < 0.5 else ())


# ------------------------------------------------------------ MIME

def _text_part(rng: random.Random) -> bytes:
    return b"Content-Type: text/plain; charset=us-ascii\n\nHello, see http://example.com/a for the details.\n"


def broken_boundaries(raw: bytes, rng: random.Random) -> bytes:
    _, _, body = split(raw)
    b = rng.choice([b"b1", b"", b"=_" * 40, b"x" * 200, b"a b", b"\xff\xfe"])
    kind = rng.randrange(7)
    ct = b'multipart/mixed; boundary="' + b + b'"'
    if kind == 1:
        ct = b"multipart/mixed; boundary=" + b + b"; boundary=other"
    elif kind == 2:
        ct = b'multipart/mixed; boundary="unterminated'
    elif kind == 3:
        ct = b"multipart/mixed"
    parts = [b"--" + b + b"\n" + _text_part(rng), b"--" + b + b"\n" + b"Content-Type: text/html\n\n<a href='http://x.example/'>x</a>\n" + body[:2000]]
    if kind == 4:  # the same boundary in a nested multipart
        parts.append(b"--" + b + b"\nContent-Type: multipart/alternative; boundary=\"" + b + b"\"\n\n--" + b + b"\n" + _text_part(rng))
    if kind == 5:  # a part without headers or a blank line
        parts.append(b"--" + b + b"\n--" + b + b"\n--" + b + b"\n")
    end = b"" if kind == 6 or rng.random() < 0.4 else b"--" + b + b"--\n"
    return with_body(raw, ct, b"preamble\n" + b"".join(parts) + end)


def bogus_charset_cte(raw: bytes, rng: random.Random) -> bytes:
    _, _, body = split(raw)
    charset = rng.choice([b"x-unknown", b"\xff\xfe", b"", b"utf-7", b"utf-16", b"utf-32", b"idna", b"rot13",
                          b"base64", b"zlib_codec", b"uu", b"hex", b"unicode-escape", b"raw-unicode-escape",
                          b"punycode", b"utf-8-sig", b"cp65001", b"iso-2022-jp", b"\"\"\"", b"us-ascii\x00",
                          b"charmap", b"utf_16_be", b"mbcs", b"undefined", b"bz2_codec", b"quopri_codec"])
    cte = rng.choice([b"base64", b"quoted-printable", b"x-uuencode", b"uuencode", b"8bit", b"binary", b"bogus",
                      b"7bit\x00", b"", b"base64; foo=bar", b"BASE64", b"x-gzip"])
    data = body[:4000]
    shape = rng.randrange(5)
    if shape == 0 and cte.lower().startswith(b"base64"):
        data = base64.encodebytes(data)[: rng.randrange(1, 4000)] + b"!!==**\n===="
    elif shape == 1:
        data = b"=ZZ=4=\n=" + data + b"=\n=\n=0"
    elif shape == 2:
        data = b"begin 644 x.txt\nM86)C\n`\nend\n" + data
    elif shape == 3:
        data = b"+ACEAIQ-+AGEA-+3AE-+2D3-" + data + b"\xff\xfe\x00\x00"
    ctype = rng.choice([b"text/plain", b"text/html", b"text/calendar", b"application/octet-stream", b"message/rfc822",
                        b"text/plain; format=flowed; delsp=yes"])
    if rng.random() < 0.5:
        inner = (b"Content-Type: " + ctype + b"; charset=\"" + charset + b"\"\nContent-Transfer-Encoding: " + cte
                 + b"\nContent-Disposition: attachment; filename*=" + rng.choice([b"utf-8''%ff%fe%00.txt",
                 b"bogus''x", b"''", b"utf-8'en'%", b"x'y'z'w"]) + b"\n\n" + data)
        return with_body(raw, b'multipart/mixed; boundary="zz"', b"--zz\n" + inner + b"\n--zz--\n")
    return with_body(raw, ctype + b"; charset=\"" + charset + b"\"", data,
                     extra=(b"Content-Transfer-Encoding: " + cte,))


def bogus_encoded_words(raw: bytes, rng: random.Random) -> bytes:
    words = [b"=?x-bogus?Q?abc?=", b"=?utf-8?B?" + base64.b64encode(b"\xff\xfe\xfd") + b"?=", b"=?utf-8?B?abc?=",
             b"=?utf-8?Q?=FF=FE?=", b"=??Q?x?=", b"=?utf-8??x?=", b"=?utf-8?X?x?=", b"=?utf-7?B?K0FDRUFJUS0=?=",
             b"=?iso-2022-jp?B?GyRCJCIbKEI=?=", b"=?idna?Q?x?=", b"=?utf-8*en?Q?x?=", b"=?unicode-escape?Q?\\N{?=",
             b"=?zlib_codec?B?eJw=?=", b"=?utf-16?B?/w==?=", b"=?utf-8?q?" + b"=E2=80=8B" * 100 + b"?="]
    extra = []
    for name in rng.sample([b"Subject", b"From", b"To", b"Reply-To", b"X-Mailer"], rng.randint(1, 3)):
        value = b" ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
        if name in (b"From", b"To", b"Reply-To"):
            value += b" <someone@example.com>"
        extra.append(name + b": " + value)
    return with_headers(raw, extra, rng, drop=tuple(line.split(b":")[0].lower() for line in extra))


def deep_multipart(raw: bytes, rng: random.Random) -> bytes:
    depth = rng.choice([50, 200, 1000])
    kind = rng.choice([b"multipart/mixed", b"multipart/alternative", b"message/rfc822", b"multipart/related"])
    out = _text_part(rng)
    for level in range(depth):
        if kind == b"message/rfc822":
            out = b"Content-Type: message/rfc822\n\nSubject: level %d\nFrom: a@b.example\n" % level + out
        else:
            b = b"d%d" % level
            out = (b"Content-Type: " + kind + b"; boundary=\"" + b + b"\"\n\n--" + b + b"\n" + out + b"\n--" + b + b"--\n")
    head, body = out.split(b"\n\n", 1)
    return with_body(raw, head.split(b": ", 1)[1], body)


def _zip_bytes(rng: random.Random, nested: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("invoice.pdf.exe", b"MZ" + b"\x00" * 200)
        z.writestr("readme.txt", b"hello " * 50)
        if nested:
            z.writestr("inner.zip", _zip_bytes(rng))
    return buf.getvalue()


def corrupt_zip(rng: random.Random) -> bytes:
    data = bytearray(_zip_bytes(rng, nested=rng.random() < 0.5))
    eocd = data.rfind(b"PK\x05\x06")
    cd = data.find(b"PK\x01\x02")
    how = rng.randrange(10)
    if how == 0:  # central directory offset past the end
        data[eocd + 16:eocd + 20] = struct.pack("<I", 0xFFFFFFF0)
    elif how == 1:  # entry counts that lie
        data[eocd + 8:eocd + 12] = struct.pack("<HH", 0xFFFF, 0xFFFF)
    elif how == 2:  # central directory size that lies
        data[eocd + 12:eocd + 16] = struct.pack("<I", rng.choice([0, 1, 0xFFFFFFFF]))
    elif how == 3:  # a file name length running past the directory
        data[cd + 28:cd + 30] = struct.pack("<H", 0xFFFF)
    elif how == 4:  # the central directory trashed
        for i in range(cd, eocd):
            data[i] = rng.randrange(256)
    elif how == 5:  # cut in the middle
        data = data[: rng.randrange(len(data))]
    elif how == 6:  # local header claims a huge uncompressed size and a bad method
        data[8:10] = struct.pack("<H", rng.choice([99, 12, 14, 0xFFFF]))
        data[cd + 10:cd + 12] = struct.pack("<H", rng.choice([99, 12, 14]))
        data[cd + 24:cd + 28] = struct.pack("<I", 0xFFFFFFFF)
    elif how == 7:  # a comment length longer than what follows
        data[eocd + 20:eocd + 22] = struct.pack("<H", 0xFFFF)
    elif how == 8:  # Zip64 end locator pointing nowhere
        data[eocd:eocd] = b"PK\x06\x07" + struct.pack("<IQI", 0, 0xFFFFFFFFFFFF, 1)
    else:  # the compressed data of a member (a nested zip's too) trashed
        at = data.rfind(b"PK\x03\x04", 0, cd)
        for i in range(at + 40, min(at + 80, cd)):
            data[i] = rng.randrange(256)
    return bytes(data)


def broken_nested_zip() -> bytes:
    """A zip holding a zip whose deflate stream is garbage."""
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.exe", b"MZ" + bytes(range(256)) * 8)
    outer = io.BytesIO()
    with zipfile.ZipFile(outer, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("inner.zip", inner.getvalue())
    data = bytearray(outer.getvalue())
    data[30 + len("inner.zip") + 20:30 + len("inner.zip") + 60] = b"\xff" * 40
    return bytes(data)


def corrupt_zip_attachment(raw: bytes, rng: random.Random) -> bytes:
    blob = corrupt_zip(rng)
    name = rng.choice([b"invoice.zip", b"x.docx", b"a.jar", b"scan.xlsm", b"noext", b"b.zip.exe", b"c.odt"])
    ctype = rng.choice([b"application/zip", b"application/octet-stream", b"application/x-zip-compressed",
                        b"application/vnd.openxmlformats-officedocument.wordprocessingml.document"])
    enc = base64.encodebytes(blob)
    if rng.random() < 0.2:
        enc = enc[: rng.randrange(len(enc))]
    body = (b"--zb\nContent-Type: text/plain\n\nSee the attachment.\n--zb\nContent-Type: " + ctype + b"; name=\"" + name
            + b"\"\nContent-Disposition: attachment; filename=\"" + name + b"\"\nContent-Transfer-Encoding: base64\n\n"
            + enc + b"--zb--\n")
    return with_body(raw, b'multipart/mixed; boundary="zb"', body)


# ------------------------------------------------------------ authentication headers

def malformed_auth_headers(raw: bytes, rng: random.Random) -> bytes:
    b64 = base64.b64encode(bytes(rng.randrange(256) for _ in range(64)))
    dkim = [b"DKIM-Signature: ", b"DKIM-Signature: v=1", b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=sel",
            b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com; s=sel; h=from:to; bh=" + b64 + b"; b=" + b64,
            b"DKIM-Signature: v=1; a=rsa-sha256; d=xn--zz-.com; s=; h=; bh=!!; b=***",
            b"DKIM-Signature: v=1; a=ed25519-sha256; d=\xff\xfe.example; s=\x00; h=from; bh=; b=",
            b"DKIM-Signature: v=2; a=rsa-sha1; d=example.com; s=s; l=-5; x=abc; t=xyz; h=from; bh=AA==; b=AA==",
            b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=s; l=99999999999999999999; h=from; bh=AA==; b=AA==",
            b"DKIM-Signature: v=1; v=1; d=a.example; d=b.example; s=s; s=t; h=from; bh=AA==; b=AA==",
            b"DKIM-Signature: v=1; a=rsa-sha256; d=" + b"a." * 200 + b"com; s=" + b"s" * 300 + b"; h=from; bh=AA==; b=AA==",
            b"DKIM-Signature: ;;;;=;=;==", b"DKIM-Signature: v=1; a=rsa-sha256; i=@; d=.; s=.; h=:; bh==; b==",
            b"DKIM-Signature: v=1; a=rsa-sha256; d=example..com; s=a.b..c; c=bogus/bogus; q=dns/bogus; h=from; bh=AA==; b=AA==",
            b"DKIM-Signature: v=1; a=rsa-sha256; d=[1.2.3.4]; s=s; h=from; bh=AA==; b=AA=="]
    arc = [b"ARC-Seal: ", b"ARC-Seal: i=abc; a=rsa-sha256; cv=none; d=example.com; s=s; b=" + b64,
           b"ARC-Seal: i=0; cv=garbage; d=example.com; s=s; b=AA==", b"ARC-Seal: i=99999999999999999999; cv=pass; b=",
           b"ARC-Seal: i=-1; cv=fail", b"ARC-Seal: i=1; i=2; cv=none; d=\xff; s=s; b=AA==",
           b"ARC-Message-Signature: i=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com; s=s; h=from; bh=" + b64 + b"; b=" + b64,
           b"ARC-Message-Signature: i=x", b"ARC-Message-Signature: ", b"ARC-Message-Signature: i=2; d=..; s=",
           b"ARC-Authentication-Results: i=1; mx.example.com; spf=pass smtp.mailfrom=a@example.com",
           b"ARC-Authentication-Results: i=; ", b"ARC-Authentication-Results: i=1", b"ARC-Authentication-Results: garbage"]
    ar = [b"Authentication-Results: ", b"Authentication-Results: ;", b"Authentication-Results: mx.example.com",
          b"Authentication-Results: mx.example.com; spf=", b"Authentication-Results: mx.example.com; =pass",
          b"Authentication-Results: (((( unbalanced; dkim=pass", b"Authentication-Results: mx; dkim=pass (comment header.d=x",
          b"Authentication-Results: mx.example.com 1; dmarc=pass header.from=\xff\xfe; spf=pass smtp.mailfrom=@",
          b"Authentication-Results: mx.example.com; none", b"Authentication-Results: mx; arc=pass (i=abc); dkim=pass header.i=",
          b"Authentication-Results: \x00; spf=pass", b"Authentication-Results: a; b; c; d; " + b"x=y; " * 500,
          b"Authentication-Results: mx; dkim=pass header.d=" + b"a" * 5000,
          b"Authentication-Results: \"quoted\\\"id\"; spf=\"pass\"; dkim=pass reason=\"unterminated"]
    extra = rng.sample(dkim, rng.randint(1, 3)) + rng.sample(arc, rng.randint(0, 4)) + rng.sample(ar, rng.randint(0, 3))
    if rng.random() < 0.3:  # a complete-looking ARC set of a bogus instance count
        n = rng.choice([b"1", b"51", b"0"])
        extra += [b"ARC-Seal: i=" + n + b"; a=rsa-sha256; cv=none; d=example.com; s=s; b=" + b64,
                  b"ARC-Message-Signature: i=" + n + b"; a=rsa-sha256; d=example.com; s=s; h=from; bh=" + b64 + b"; b=" + b64,
                  b"ARC-Authentication-Results: i=" + n + b"; mx.example.com; spf=pass"]
    if rng.random() < 0.3:
        extra = [line.replace(b"; ", b";\n\t") for line in extra]
    return with_headers(raw, extra, rng)


# ------------------------------------------------------------ URLs

_BAD_URLS = [b"http://xn--a.com/", b"http://xn--zz-.com/x", b"http://xn--80ak6aa92e.xn--p1ai/", b"http://xn--/",
             b"http://exa\xe2\x80\x8bmple.com/", b"http://[::1", b"http://[zzzz::1]/", b"http://[::ffff:1.2.3.4.5]/",
             b"http://[v1.fe]/", b"http://[1:2:3:4:5:6:7:8:9]/", b"http://[]/", b"http://[fe80::1%25eth0]/",
             b"http://host:99999/", b"http://host:-1/", b"http://host:abc/", b"http://host:/", b"http://host::80/",
             b"http://user@@host/", b"http://%zz/", b"http://./", b"http://.../", b"http://a..b/", b"http:///path",
             b"http://" + b"a" * 64 + b".com/", b"http://" + b"a." * 130 + b"com/", b"http://ex%41mple.com/",
             b"http://256.256.256.256/", b"http://0x7f.1/", b"http://017700000001/", b"http://4294967296/",
             b"http://\xe2\x91\xa0\xe2\x91\xa1.com/", b"http://\xc3\xa9xample.com:80/", b"http://\xff\xfe.com/",
             b"http://a\x00b.com/", b"http://-a-.com/", b"http://a_b.com/", b"https://\xef\xbc\x8e.com/",
             b"http://xn--ls8h.la/", b"http://www.\xd1\x80\xd0\xb0y\xd1\x80\xd0\xb0l.com/", b"hxxp://a.b/",
             b"http://a.b:80:80/", b"http://[::1]:99999/", b"http://1.2.3.4:0/", b"http://a.b/%", b"mailto:@",
             b"http://\\\\evil.com/", b"http:\\\\evil.com\\", b"//evil.com", b"http://a.b#frag\xff",
             b"http://.xn--.com/", b"http://xn--bcher-kva.xn--/", b"http://\xe1\x9e\xb4.com/", b"http://\xcd\x8f.com/",
             b"http://a" + b"\xcc\x81" * 100 + b".com/"]


def malformed_urls(raw: bytes, rng: random.Random) -> bytes:
    urls = rng.sample(_BAD_URLS, rng.randint(1, 8))
    shape = rng.randrange(3)
    if shape == 0:
        body = b"Click these:\n" + b"\n".join(urls) + b"\n"
        return with_body(raw, b"text/plain; charset=utf-8", body, extra=(b"Content-Transfer-Encoding: 8bit",))
    links = []
    for u in urls:
        text = rng.choice([b"here", rng.choice(_BAD_URLS), b"https://www.paypal.com/", b"&#x68;ttp://x", b""])
        links.append(b'<a href="' + u + b'">' + text + b"</a> <img src=\"" + rng.choice(_BAD_URLS) + b"\">"
                     + b" <form action=\"" + rng.choice(_BAD_URLS) + b"\"></form>")
    html = b"<html><body>" + b"<br>".join(links) + b"<a href=\"&#104;ttp://a&#0;b.com\">x</a></body></html>"
    if rng.random() < 0.3:  # numeric references past Python's 4,300-digit int limit
        html = html.replace(b"<br>", b"<br>&#" + b"9" * 5000 + b";&#x" + b"f" * 5000 + b";", 1)
    if shape == 1:
        return with_body(raw, b"text/html; charset=utf-8", html, extra=(b"Content-Transfer-Encoding: 8bit",))
    return with_body(raw, b"multipart/alternative; boundary=\"u\"",
                     b"--u\nContent-Type: text/plain\n\n" + b" ".join(urls) + b"\n--u\nContent-Type: text/html\n\n" + html + b"\n--u--\n")


def degenerate(raw: bytes, rng: random.Random) -> bytes:
    return rng.choice([b"", b"\n", b"\r\n\r\n", b"Subject: x", b"Subject: x\n", b":\n\n", b"\x00" * 100,
                       b"From: a@b.example\n\n" + b"\n" * 10000, b"Content-Type: multipart/mixed\n\n",
                       b"Content-Type: message/rfc822\n\n", b"\n\n" + raw, b" folded first line\n" + raw,
                       b"Subject: x\n\n" + b"a" * 300_000, b"Subject: x\n\n" + b"x" * 1_000_000 + b"\n"])


MUTATORS = {
    "truncate": truncate,
    "flip_bytes": flip_bytes,
    "mixed_line_endings": mixed_line_endings,
    "header_without_colon": header_without_colon,
    "eight_bit_headers": eight_bit_headers,
    "huge_header": huge_header,
    "many_headers": many_headers,
    "bogus_addresses": bogus_addresses,
    "bogus_dates_and_received": bogus_dates_and_received,
    "broken_boundaries": broken_boundaries,
    "bogus_charset_cte": bogus_charset_cte,
    "bogus_encoded_words": bogus_encoded_words,
    "deep_multipart": deep_multipart,
    "corrupt_zip_attachment": corrupt_zip_attachment,
    "malformed_auth_headers": malformed_auth_headers,
    "malformed_urls": malformed_urls,
    "degenerate": degenerate,
}


def mutate(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One or (now and then) two mutations of RAW; their names joined by '+'."""
    names = [rng.choice(list(MUTATORS))]
    if rng.random() < 0.25:
        names.append(rng.choice(list(MUTATORS)))
    for name in names:
        raw = MUTATORS[name](raw, rng)
    return "+".join(names), raw


def nastiest(raw: bytes) -> list[tuple[str, bytes]]:
    """Hand-picked worst cases made from RAW, for the end-to-end test: each of these once
    broke a check, or stresses the milter's own handling of what the MTA passes on."""
    rng = random.Random(1)
    head, nl, body = split(raw)
    sigs = [b"DKIM-Signature: v=1; a=rsa-sha256; d=example%d.com; s=s%d; h=from; bh=AA==; b=AA==" % (i, i)
            for i in range(3000)]
    return [
        ("3000 DKIM signatures", with_headers(raw, sigs, rng)),
        # In a part's header, as a header value reaches a milter only up to a NUL (Postfix
        # also cuts a body line at a NUL; Sendmail and `milterguard scan` do not).
        ("charset with a NUL", with_body(raw, b'multipart/mixed; boundary="n"', b'--n\nContent-Type: text/plain; '
                                         b'charset="us-ascii\x00"\n\n' + body[:3000] + b"\n--n--\n")),
        ("1000 nested multiparts", deep_multipart(raw, random.Random(3))),
        ("NUL and 8-bit headers", eight_bit_headers(raw, random.Random(4))),
        ("zip with a trashed central directory", corrupt_zip_attachment(raw, random.Random(2))),
        ("malformed URLs", malformed_urls(raw, random.Random(6))),
        ("malformed DKIM, ARC and A-R", malformed_auth_headers(raw, random.Random(7))),
        ("broken boundaries", broken_boundaries(raw, random.Random(8))),
        ("UTF-7 with lone surrogates", with_body(raw, b'text/plain; charset="utf-7"', b"a+3AE-b +2D3-\n")),
        ("nested zip with a broken stream", with_body(raw, b'multipart/mixed; boundary="z"', b"--z\nContent-Type: "
                                                       b"application/zip; name=a.zip\nContent-Transfer-Encoding: base64"
                                                       b"\n\n" + base64.encodebytes(broken_nested_zip()) + b"--z--\n")),
        ("cut inside the headers", head[: len(head) // 2]),
        ("250,000 words", with_body(raw, b"text/plain", b"win cash now " * 85_000)),
    ]
