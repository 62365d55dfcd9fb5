"""Links carried by attachments rather than by the text: PDF link annotations, QR codes.

Phishing moved its links where text filters do not look: a PDF whose only
content is a "View document" button, a QR code in an image or in a PDF that
the recipient scans with a phone.  This module reads those links so that they
join the message's URLs (`Message.urls`, source "pdf" or "qr") and go through
the same URL checks, maps and blocklists as a link in the text.

Every step is bounded (`LinkLimits`): PDFs and images above a size are not
opened, at most so many PDF pages and images are read, an image of more
pixels than allowed is never decoded (its size is read from its header), and
the whole work of one message stops at a deadline.  Nothing here raises on a
broken or hostile file: what cannot be read yields no link.

- PDF: pypdf, pure Python.  The URI actions of link annotations and of the
  document's open action, and the images of each page (for QR codes).  A
  first page that draws many paths and whose PDF had no QR code in an image
  is rendered by Poppler's pdftoppm in its own process (`pdfrender`), for a
  QR code drawn as vector paths.
- QR codes: zbar (Debian's libzbar0) through pyzbar, on a grey-scale copy
  made by Pillow.  Images are PNG, JPEG or GIF parts, inline or attached, and
  `data:image/...;base64,` images inside HTML.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import re
import struct
import sys
import time
import warnings
import zlib
from dataclasses import dataclass, field

from milterguard.mail.pdfrender import render_page, worth_rendering
from milterguard.mail.urls import find_text_urls

# pypdf logs every oddity of a broken file as a warning: a hostile PDF would flood the log.
logging.getLogger("pypdf").setLevel(logging.ERROR)

__all__ = ["LinkLimits", "AttachedLink", "attached_links", "is_markup_attachment", "pdf_links", "qr_texts"]


@dataclass(frozen=True)
class LinkLimits:
    """How much attachment work one message may cost (settings `attachments.*`)."""

    enabled: bool = True
    pdf_max_bytes: int = 5 * 1024 * 1024
    pdf_max_pages: int = 10
    image_max_bytes: int = 5 * 1024 * 1024
    image_max_pixels: int = 4_000_000
    max_images: int = 4
    seconds: float = 1.0
    pdf_render: bool = True
    pdf_render_pages: int = 2
    pdf_render_side: int = 1200
    pdf_render_memory: int = 512 * 1024 * 1024


@dataclass
class AttachedLink:
    """A URL found in an attachment: `source` "pdf" (a link annotation) or "qr" (a QR code);
    `where` names the part ("invoice.pdf page 1", "image001.png")."""

    url: str
    source: str
    where: str


@dataclass
class _Budget:
    limits: LinkLimits
    deadline: float
    images: int = 0
    renders: int = 0
    notes: list[str] = field(default_factory=list)

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def take_image(self) -> bool:
        if self.images >= self.limits.max_images or self.out_of_time():
            return False
        self.images += 1
        return True


_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"GIF87a", "gif"), (b"GIF89a", "gif"))
# A QR code needs at least 21 modules a side and a few pixels each: smaller images are icons and spacers.
_MIN_SIDE = 40
# Images are scanned at most this many pixels a side (scaled down by a whole factor).
_SCAN_SIDE = 1000
_DATA_IMAGE = re.compile(rb"data:image/(?:png|jpe?g|gif);base64,([A-Za-z0-9+/=\s]{200,2800000})", re.I)
# What pypdf and Pillow raise on files they cannot read, besides their own errors (Pillow's PNG and
# other readers raise SyntaxError for a broken file).
_READ_ERRORS = (SyntaxError, ValueError, KeyError, TypeError, IndexError, AttributeError, AssertionError, RecursionError,
                OSError, EOFError, zlib.error, struct.error, binascii.Error, UnicodeError, OverflowError,
                MemoryError, NotImplementedError)


_MARKUP_MAX = 1024 * 1024
_ATOB = re.compile(r"""\batob\s*\(\s*["']([A-Za-z0-9+/]{16,4000}={0,2})["']\s*\)""")
_MARKUP_NAME = re.compile(r"(?i)\.(?:s?html?|xhtml|svgz?|shtml)$")


def is_markup_attachment(part) -> str | None:
    """"svg" or "html" for an attached SVG image or HTML page (what a browser opens), else None."""
    ctype = part.content_type
    name = (part.filename or "").strip().rstrip(".")
    if ctype == "image/svg+xml" or name.lower().endswith((".svg", ".svgz")):
        return "svg"
    if part.is_attachment and (part.is_html or _MARKUP_NAME.search(name)):
        return "html"
    return None


def _is_active_markup(part) -> bool:
    return is_markup_attachment(part) is not None


def _image_kind(data: bytes) -> str | None:
    for magic, kind in _IMAGE_MAGIC:
        if data.startswith(magic):
            return kind
    return None


def qr_texts(data: bytes, limits: LinkLimits) -> list[str]:
    """The texts of the QR codes in an image (PNG, JPEG, GIF bytes); [] when there are none
    or when the image is over the limits (its pixel count is read before anything is decoded)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return []
    if len(data) > limits.image_max_bytes:
        return []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > limits.image_max_pixels or min(width, height) < _MIN_SIDE:
                return []
            if image.format == "JPEG":
                # Decode a large JPEG at a reduced scale straight away (DCT scaling, cheap).
                image.draft("L", (max(_SCAN_SIDE, width // 8), max(_SCAN_SIDE, height // 8)))
            image.seek(0)  # the first frame of an animation
            return _pil_qr_texts(image, limits)
    except (Image.DecompressionBombError, *_READ_ERRORS):
        return []


def _pil_qr_texts(image, limits: LinkLimits, scan_side: int = _SCAN_SIDE) -> list[str]:
    """QR texts of a PIL image (one frame), scaled down to SCAN_SIDE first."""
    try:
        from pyzbar import pyzbar
        from pyzbar.pyzbar_error import PyZbarError
    except ImportError:
        return []
    try:
        width, height = image.size
        if width * height > limits.image_max_pixels or min(width, height) < _MIN_SIDE:
            return []
        grey = image.convert("L")
        factor = -(-max(width, height) // scan_side)
        if factor > 1 and min(width, height) // factor >= _MIN_SIDE:
            # zbar's time grows with the pixels; a QR code big enough to scan from a screen keeps
            # several pixels a module at this size.
            grey = grey.reduce(factor)
        found = pyzbar.decode(grey, symbols=[pyzbar.ZBarSymbol.QRCODE])
    except (PyZbarError, *_READ_ERRORS):
        return []
    return [symbol.data.decode("utf-8", "replace") for symbol in found if symbol.data]


def _uri_of(action) -> str | None:
    """The URI of a PDF action dictionary (/S /URI), or None."""
    try:
        action = action.get_object()
        if action.get("/S") == "/URI":
            uri = action.get("/URI")
            if isinstance(uri, bytes):
                uri = uri.decode("latin-1")
            return str(uri).strip() if uri else None
    except _READ_ERRORS:
        return None
    return None


def _pypdf():
    """pypdf's reader and error class, imported on the first PDF.

    pypdf loads the `cryptography` package, when it is there, for AES-encrypted files: 7 MB more
    in every worker and 0.15 s for one feature. Unless something else loaded it already, pypdf is
    imported without it and uses its own fallback (RC4 only): a PDF encrypted with AES yields no
    link, as one with a password does.
    """
    if "pypdf" not in sys.modules and "cryptography" not in sys.modules:
        sys.modules["cryptography"] = None  # makes `import cryptography` fail
        try:
            import pypdf  # noqa: F401
        finally:
            del sys.modules["cryptography"]
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    return PdfReader, PyPdfError


def pdf_links(data: bytes, name: str, limits: LinkLimits, budget: _Budget | None = None) -> list[AttachedLink]:
    """URIs of a PDF's link annotations and open action, and its images' QR codes."""
    if budget is None:
        budget = _Budget(limits, time.monotonic() + limits.seconds)
    if len(data) > limits.pdf_max_bytes:
        return []
    try:
        PdfReader, PyPdfError = _pypdf()
    except ImportError:  # pragma: no cover - pypdf is a dependency
        return []
    out: list[AttachedLink] = []
    drawn: list[int] = []  # pages that draw enough paths to hold a QR code
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = PdfReader(io.BytesIO(data), strict=False)
            if reader.is_encrypted:
                # An empty user password is common (the file only forbids printing); others stay shut.
                if not reader.decrypt(""):
                    return []
            opening = reader.trailer.get("/Root", {}).get_object().get("/OpenAction")
            if opening is not None and hasattr(opening, "get_object"):
                uri = _uri_of(opening)
                if uri:
                    out.append(AttachedLink(uri, "pdf", f"{name} open action"))
            for number, page in enumerate(reader.pages):
                if number >= limits.pdf_max_pages or budget.out_of_time():
                    break
                where = f"{name} page {number + 1}"
                for annot in page.get("/Annots") or []:
                    annot = annot.get_object()
                    if annot.get("/Subtype") != "/Link":
                        continue
                    action = annot.get("/A")
                    uri = _uri_of(action) if action is not None else None
                    if uri:
                        out.append(AttachedLink(uri, "pdf", where))
                out.extend(_page_qr_links(page, where, budget))
                if limits.pdf_render and number < limits.pdf_render_pages and worth_rendering(page):
                    drawn.append(number + 1)
    except (PyPdfError, *_READ_ERRORS):
        return out
    if drawn and not any(link.source == "qr" for link in out):
        out.extend(_drawn_qr_links(data, name, drawn, budget))
    return out


def _drawn_qr_links(data: bytes, name: str, pages: list[int], budget: _Budget) -> list[AttachedLink]:
    """QR codes drawn as paths on PAGES of a PDF, read from the pages rendered by pdftoppm."""
    limits = budget.limits
    out = []
    for number in pages:
        if budget.renders >= limits.pdf_render_pages or budget.out_of_time():
            break
        budget.renders += 1
        image = render_page(data, number, limits.pdf_render_side, limits.pdf_render_memory, budget.deadline)
        if image is None:
            continue
        # Rendered at the size it is read at: not scaled down again.
        for text in _pil_qr_texts(image, limits, scan_side=max(_SCAN_SIDE, limits.pdf_render_side)):
            out.append(AttachedLink(text, "qr", f"{name} page {number} (drawn)"))
    return out


_BY_PYPDF = object()  # an image kind whose decoding pypdf leaves to Pillow's C code
_COMPONENTS = {"/DeviceGray": 1, "/CalGray": 1, "/DeviceRGB": 3, "/CalRGB": 3}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _xobject_image(obj, width: int, height: int):
    """A PIL image of a PDF image XObject, decoded by Pillow's C code, or None for a kind not read here.

    pypdf undoes PNG predictors in pure Python (a second for a page-sized image); a Flate stream
    with a PNG predictor is the IDAT data of a PNG, so it is wrapped in one and Pillow decodes it.
    JPEG (DCTDecode) goes to Pillow as it is. Other filters (JPEG 2000, CCITT, JBIG2), indexed
    colours and masks are not read: QR codes are rarely drawn so.
    """
    from PIL import Image

    filters = obj.get("/Filter")
    if isinstance(filters, list):
        if len(filters) != 1:
            return None
        filters = filters[0]
    raw = obj._data  # the stream as stored, before pypdf's filters
    if filters == "/CCITTFaxDecode":
        return _BY_PYPDF
    if filters == "/DCTDecode":
        image = Image.open(io.BytesIO(raw))
        return image if image.size[0] * image.size[1] == width * height else None
    if filters != "/FlateDecode":
        return None
    space = obj.get("/ColorSpace")
    if hasattr(space, "get_object"):
        space = space.get_object()
    if isinstance(space, list) and len(space) == 2 and space[0] == "/ICCBased":
        colours = int(space[1].get_object().get("/N", 0))
    else:
        colours = _COMPONENTS.get(space) if isinstance(space, str) else None  # an indexed palette is not read
    bits = int(obj.get("/BitsPerComponent", 8))
    if colours not in (1, 3) or bits not in (1, 8) or (bits == 1 and colours != 1):
        return None
    params = obj.get("/DecodeParms") or {}
    if isinstance(params, list):
        params = params[0] if params else {}
    params = params.get_object() if hasattr(params, "get_object") else params
    predictor = int(params.get("/Predictor", 1))
    if predictor >= 10:
        if int(params.get("/Colors", 1)) != colours or int(params.get("/Columns", 1)) != width:
            return None
        header = struct.pack(">IIBBBBB", width, height, bits, 0 if colours == 1 else 2, 0, 0, 0)
        png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", raw) + _png_chunk(b"IEND", b"")
        return Image.open(io.BytesIO(png))
    if predictor != 1:
        return None
    size = (width * bits * colours + 7) // 8 * height
    data = zlib.decompressobj().decompress(raw, size)  # never more than the image declares
    if len(data) < size:
        return None
    mode = "1" if bits == 1 else ("L" if colours == 1 else "RGB")
    return Image.frombytes(mode, (width, height), data)


def _page_qr_links(page, where: str, budget: _Budget) -> list[AttachedLink]:
    """QR codes in the image XObjects of one PDF page, sizes checked before decoding."""
    limits = budget.limits
    resources = page.get("/Resources")
    resources = resources.get_object() if resources is not None else None
    xobjects = resources.get("/XObject") if resources is not None else None
    if xobjects is None:
        return []
    xobjects = xobjects.get_object()
    out = []
    for key in list(xobjects.keys())[:32]:
        obj = xobjects[key].get_object()
        if obj.get("/Subtype") != "/Image":
            continue
        width, height = int(obj.get("/Width", 0) or 0), int(obj.get("/Height", 0) or 0)
        if width * height > limits.image_max_pixels or min(width, height) < _MIN_SIDE:
            continue
        if not budget.take_image():
            break
        try:
            image = _xobject_image(obj, width, height)
            if image is _BY_PYPDF:
                image = page.images[key].image  # CCITT fax: pypdf hands Pillow a TIFF, decoded in C
        except _READ_ERRORS:
            continue  # one image that cannot be read loses neither the others nor the page's links
        if image is None:
            continue
        for text in _pil_qr_texts(image, limits):
            out.append(AttachedLink(text, "qr", f"{where} image {key.lstrip('/')}"))
    return out


def attached_links(parts, html_parts, limits: LinkLimits) -> list[AttachedLink]:
    """The links of a message's PDF parts and the QR codes of its images.

    PARTS are the message's leaf parts; HTML_PARTS the HTML texts, searched for
    `data:image` images.  Only parts whose bytes are a PDF or an image cost
    anything.
    """
    if not limits.enabled:
        return []
    budget = _Budget(limits, time.monotonic() + limits.seconds)
    out: list[AttachedLink] = []
    for index, part in enumerate(parts):
        data = part.payload
        if not data or (part.text is not None and not _is_active_markup(part)):
            continue
        name = part.filename or f"part {index + 1} ({part.content_type})"
        if data.startswith(b"%PDF-") or (part.content_type == "application/pdf" and b"%PDF-" in data[:1024]):
            if not budget.out_of_time():
                out.extend(pdf_links(data, name, limits, budget))
        elif _image_kind(data) and budget.take_image():
            out.extend(AttachedLink(text, "qr", name) for text in qr_texts(data, limits))
        elif _is_active_markup(part):
            # URLs an HTML or SVG attachment opens from its scripts (window.location = "https://...")
            # and SVG links: the text of an HTML attachment reaches the link extraction already.
            text = (part.text if part.text is not None else data[:_MARKUP_MAX].decode("utf-8", "replace"))
            text = text[:_MARKUP_MAX]
            for url in find_text_urls(text, 100):
                out.append(AttachedLink(url.url, "html", name))
            # A kit hides where its form posts in base64: atob("aHR0cHM6Ly9...").
            for literal in _ATOB.findall(text)[:20]:
                try:
                    decoded = base64.b64decode(literal, validate=True).decode("utf-8", "replace")
                except (binascii.Error, ValueError):
                    continue
                for url in find_text_urls(decoded, 10):
                    out.append(AttachedLink(url.url, "html", f"{name} (base64 in its script)"))
    for html in html_parts:
        if "data:image/" not in html and "DATA:IMAGE/" not in html and "Data:image/" not in html:
            continue
        for match in _DATA_IMAGE.finditer(html.encode("ascii", "ignore")):
            if not budget.take_image():
                break
            try:
                data = base64.b64decode(re.sub(rb"\s+", b"", match.group(1)))
            except binascii.Error:
                continue
            if _image_kind(data):
                out.extend(AttachedLink(text, "qr", "data: image in HTML") for text in qr_texts(data, limits))
    return out
