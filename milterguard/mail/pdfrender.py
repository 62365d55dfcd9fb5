"""QR codes drawn in a PDF as vector paths: the page rendered to a grey image, then read by zbar.

A phishing PDF often draws its QR code with filled rectangles (`x y w h re f`),
not as an image, so reading the page's images finds nothing.  Such a page is
rendered by Poppler's `pdftoppm` (Debian's poppler-utils) and the picture goes
to the same QR decoder as an attached image.

Rendering costs tens of milliseconds a page, so it is done only when it is
worth it: `worth_rendering` reads the page's content stream (and those of the
forms it draws), bounded in bytes, and counts the rectangles and sub-paths
that are filled (not those that only clip); a page of text or of images fills
few, a QR code one per module or per run of modules.

`pdftoppm` runs as its own process, so a crash or a hang of the PDF parser on
a hostile file costs one page and nothing else: the PDF goes in on its
standard input, the picture (PGM, at most `side` pixels on its long side,
whatever size the page claims) comes back on its standard output, the process
is killed at the deadline, and its address space and CPU time are limited by
`prlimit` (util-linux).  When `pdftoppm` is not installed, that is logged
once and PDFs are read as before.
"""

from __future__ import annotations

import io
import logging
import re
import shutil
import subprocess
import threading
import time
import zlib

log = logging.getLogger(__name__)

__all__ = ["filled_subpaths", "worth_rendering", "render_page", "renderer", "stats"]

# How many pages were rendered, and how many of those renders failed (killed, crashed, no picture),
# since the process started: read by the tests and by bench/attachment_links.py.
stats = {"rendered": 0, "failed": 0}

# Bytes of content stream read per page (after decompression) to count its path operators.
CONTENT_MAX = 512 * 1024
# A QR code of version 1 has 21 x 21 modules, about half of them dark; drawn module by module or
# as runs of modules it takes well over this many rectangles or sub-paths.
MIN_PATHS = 60
# The operators that build a sub-path (`re` a rectangle, `m` a new sub-path) and those that end a
# path: filled (f F f* B B* b b*), or stroked or only used to clip (S s n).
_OPERATORS = re.compile(rb"(?<![A-Za-z0-9'\"*])(re|m|f\*?|F|[Bb]\*?|[nSs])(?![A-Za-z0-9*])")
_FILLS = frozenset((b"f", b"f*", b"F", b"B", b"B*", b"b", b"b*"))
_FORMS_MAX = 8

_lock = threading.Lock()
_checked: dict[str, str | None] = {}


def renderer() -> str | None:
    """The path of `pdftoppm`, or None when it is not installed (logged once per process)."""
    with _lock:
        if "pdftoppm" not in _checked:
            path = shutil.which("pdftoppm")
            _checked["pdftoppm"] = path
            _checked["prlimit"] = shutil.which("prlimit")
            if path is None:
                log.warning("pdftoppm not found (Debian package poppler-utils): QR codes drawn in PDFs as "
                            "vector paths are not read; links and images of PDFs still are")
        return _checked["pdftoppm"]


def _stream_bytes(obj, limit: int) -> bytes:
    """The decoded bytes of a content stream, at most LIMIT of them; b"" for a filter not read here."""
    filters = obj.get("/Filter")
    if isinstance(filters, list):
        if len(filters) > 1:
            return b""
        filters = filters[0] if filters else None
    raw = obj._data
    if filters is None:
        return raw[:limit]
    if filters != "/FlateDecode":
        return b""
    try:
        return zlib.decompressobj().decompress(raw, limit)  # never more than LIMIT, whatever the stream says
    except zlib.error:
        return b""


def _page_streams(page, limit: int) -> list[bytes]:
    contents = page.get("/Contents")
    if contents is None:
        return []
    contents = contents.get_object()
    streams = list(contents) if isinstance(contents, list) else [contents]
    resources = page.get("/Resources")
    resources = resources.get_object() if resources is not None else None
    xobjects = resources.get("/XObject") if resources is not None else None
    if xobjects is not None:
        xobjects = xobjects.get_object()
        forms = [xobjects[key] for key in list(xobjects.keys())[:32]]
        streams.extend([form for form in forms if form.get_object().get("/Subtype") == "/Form"][:_FORMS_MAX])
    out, left = [], limit
    for stream in streams[:16]:
        if left <= 0:
            break
        data = _stream_bytes(stream.get_object(), left)
        out.append(data)
        left -= len(data)
    return out


def filled_subpaths(data: bytes) -> int:
    """How many rectangles and sub-paths of a content stream are filled (not only stroked or clipped)."""
    filled = pending = 0
    for match in _OPERATORS.finditer(data):
        op = match.group(1)
        if op == b"re" or op == b"m":
            pending += 1
        else:
            if op in _FILLS:
                filled += pending
            pending = 0
    return filled


def worth_rendering(page) -> bool:
    """Whether a pypdf page fills enough rectangles or sub-paths to hold a QR code drawn as paths."""
    streams = _page_streams(page, CONTENT_MAX)
    # Each `re` or `m` operator holds those bytes: fewer of them than MIN_PATHS, and the operators
    # need not be parsed (bytes.count runs at memory speed, the regular expression does not).
    if sum(data.count(b"re") + data.count(b"m") for data in streams) < MIN_PATHS:
        return False
    return sum(filled_subpaths(data) for data in streams) >= MIN_PATHS


def render_page(data: bytes, number: int, side: int, memory: int, deadline: float):
    """Page NUMBER (from 1) of the PDF DATA as a grey PIL image of at most SIDE pixels on its long
    side, or None when it cannot be rendered in the time left before DEADLINE (time.monotonic())."""
    program = renderer()
    left = deadline - time.monotonic()
    if program is None or left <= 0.01:
        return None
    command = [program, "-q", "-gray", "-f", str(number), "-l", str(number), "-scale-to", str(side), "-"]
    limit = _checked.get("prlimit")
    if limit:
        command = [limit, f"--as={memory}", f"--cpu={max(1, int(left + 1))}", "--", *command]
    _count("rendered")
    try:
        done = subprocess.run(command, input=data, capture_output=True, timeout=left, check=False,
                              close_fds=True, env={"PATH": "/usr/bin:/bin"})
    except (subprocess.TimeoutExpired, OSError) as exc:
        return _failed(f"{type(exc).__name__}: {exc}")
    picture = done.stdout
    if done.returncode != 0 or not picture.startswith(b"P5") or len(picture) > side * side + 64:
        return _failed(f"exit status {done.returncode}, {len(picture)} bytes of picture")
    from PIL import Image

    try:
        return Image.open(io.BytesIO(picture))
    except (OSError, SyntaxError, ValueError) as exc:
        return _failed(f"unreadable picture: {exc}")


def _count(what: str) -> None:
    with _lock:
        stats[what] += 1


def _failed(why: str) -> None:
    """A page that could not be rendered: counted, logged at debug level (a hostile PDF is no news)."""
    _count("failed")
    log.debug("pdftoppm rendered no page: %s", why)
    return None
