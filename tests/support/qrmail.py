"""Messages that carry QR codes: a PNG image, and a PDF that draws the code as vector paths
(`x y w h re f`, one rectangle per dark module), written by hand from the qrcode library's matrix."""

from __future__ import annotations

import base64
import io
import zlib

import qrcode

LURE = "https://docs-share-view.web.app/file?id=bob"
TEXT = b"BT /F1 12 Tf 72 760 Td (Scan the code to view your shared document) Tj ET\n"


def qr_paths(text: str, x0: float = 100, y0: float = 400, module: float = 4.0, fill: str = "f") -> bytes:
    """A content stream that draws TEXT's QR code as one filled rectangle per dark module."""
    code = qrcode.QRCode(border=0)
    code.add_data(text)
    code.make(fit=True)
    matrix = code.get_matrix()
    ops = ["0 g"]
    for row, cells in enumerate(matrix):
        for col, dark in enumerate(cells):
            if dark:
                ops.append(f"{x0 + col * module:.2f} {y0 + (len(matrix) - 1 - row) * module:.2f} "
                           f"{module:.2f} {module:.2f} re")
    ops.append(fill)
    return "\n".join(ops).encode() + b"\n"


def pdf(contents: list[bytes], size: tuple[float, float] = (595, 842), count: int | None = None,
        compress: bool = True, repeat: int = 1) -> bytes:
    """A PDF of one page per content stream (Flate-compressed unless told not to), its page tree
    listing them REPEAT times; COUNT overrides the page count the page tree claims."""
    objects: list[bytes] = [b"<< /Type /Catalog /Pages 2 0 R >>", b""]
    kids = []
    for content in contents:
        page_no, stream_no = len(objects) + 1, len(objects) + 2
        kids.append(f"{page_no} 0 R")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {size[0]} {size[1]}] /Contents {stream_no} 0 R "
                       "/Resources << /Font << /F1 << /Type /Font /Subtype /Type1 /BaseFont /Helvetica >> >> >> >>"
                       .encode())
        data = zlib.compress(content) if compress else content
        flt = b" /Filter /FlateDecode" if compress else b""
        objects.append(b"<< /Length %d%s >>\nstream\n" % (len(data), flt) + data + b"\nendstream")
    kids *= repeat
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {count or len(kids)} >>".encode()
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def message_with_pdf(data: bytes) -> bytes:
    encoded = base64.encodebytes(data).decode()
    return ("From: Docs <docs@example.net>\nTo: bob@example.org\nSubject: Shared document\n"
            "Date: Mon, 02 Sep 2024 10:00:00 +0000\nMessage-ID: <drawn@example.net>\nMIME-Version: 1.0\n"
            'Content-Type: multipart/mixed; boundary="b1"\n\n--b1\nContent-Type: text/plain\n\n'
            "A document was shared with you.\n--b1\nContent-Type: application/pdf\n"
            'Content-Disposition: attachment; filename="shared.pdf"\nContent-Transfer-Encoding: base64\n\n'
            f"{encoded}--b1--\n").encode()


def message_with_png(text: str = LURE) -> bytes:
    """A message with TEXT's QR code as an attached PNG image."""
    buf = io.BytesIO()
    qrcode.make(text, box_size=6, border=4).get_image().convert("RGB").save(buf, "PNG")
    encoded = base64.encodebytes(buf.getvalue()).decode()
    return ("From: Docs <docs@example.net>\nTo: bob@example.org\nSubject: Shared document\n"
            "Date: Mon, 02 Sep 2024 10:00:00 +0000\nMessage-ID: <png@example.net>\nMIME-Version: 1.0\n"
            'Content-Type: multipart/mixed; boundary="b1"\n\n--b1\nContent-Type: text/plain\n\n'
            "Scan the code to read the document.\n--b1\nContent-Type: image/png\n"
            'Content-Disposition: attachment; filename="scan.png"\nContent-Transfer-Encoding: base64\n\n'
            f"{encoded}--b1--\n").encode()
