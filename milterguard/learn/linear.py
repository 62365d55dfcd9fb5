"""Linear models on hashed tokens: the token hash, the feature columns, and the shipped model.

Bayes, the classifier trained from a site's own mail (`stores/models.py`)
and the model shipped with the package share what is here:

- `token_hash`: the 64-bit hash a token is counted and looked up by;
- `columns`: a message's token hashes as feature columns (`DIM` of them);
- `LinearModel`: weights over the columns and an intercept; a message's
  margin is the sum of its columns' weights over the square root of their
  number, plus the intercept, and its probability `1 / (1 + exp(-SCALE * z))`.

The **shipped model** (`milterguard/data/default-model.bin`, built by
`milterguard train --corpus`) is such a model, its weights stored as int16
times one scale.  It is read from the package without Redis and without
numpy (a scan without Redis imports neither).  It sees the tokens of `shipped_tokens`:
the shared tokens without what says "mailing list" (list headers, the
list's own name and host, the Sender and Return-Path of the list's
bounces), because the ham it was trained on is all list mail and a site's
own mail mostly is not.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
import threading
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from milterguard.learn.tokens import Pieces
    from milterguard.mail.message import Message

DIM = 1 << 20
# The classifier's margin z becomes a probability 1 / (1 + exp(-SCALE * z)):
# the modified Huber loss puts the two classes at z = -1 and z = +1, which
# this maps to 0.12 and 0.88.
SCALE = 2.0

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
SHIPPED_MODEL = os.path.join(DATA_DIR, "default-model.bin")
SHIPPED_PROVENANCE = os.path.join(DATA_DIR, "default-model.json")
MAGIC = b"MGLM1\n"


def token_hash(token: str) -> int:
    """The 64-bit hash a token is stored and hashed into features by: its 8-byte BLAKE2b
    (digests8), read as a big-endian number."""
    return int.from_bytes(digests8([token]), "big")


def digests8(texts: list[str]) -> bytes:
    """The 8-byte BLAKE2b digest of each text (UTF-8), joined: token_hash() of each token as 8
    big-endian bytes.  Each hash starts as a copy of one empty hash of that size, which costs
    less than making one with its keyword arguments (a quarter less time per text, the same
    values)."""
    fresh = hashlib.blake2b(digest_size=8).copy
    out: list[bytes] = []
    append = out.append
    for text in texts:
        h = fresh()
        h.update(text.encode("utf-8", "surrogatepass"))
        append(h.digest())
    return b"".join(out)


def token_hashes(tokens: list[str]) -> list[int]:
    """token_hash() of each token, without a Python call per token (the same values)."""
    return list(struct.unpack(f">{len(tokens)}Q", digests8(tokens)))


def token_hash_array(tokens: list[str]) -> "np.ndarray":
    """token_hashes() as a numpy uint64 array (the same values): the digests are joined and read
    as big-endian numbers in one piece, and what reads them as an array (the Bayes look-up, the
    classifier's columns) does not convert 64-bit Python integers one by one."""
    import numpy as np

    return np.frombuffer(digests8(tokens), dtype=">u8").astype(np.uint64)


def columns(hashes: list[int]) -> "np.ndarray":
    """The feature columns of a message's token hashes (unique, sorted)."""
    import numpy as np

    low = np.asarray(hashes, dtype=np.uint64) & np.uint64(0xFFFFFFFF)
    return np.unique(low % np.uint64(DIM)).astype(np.int64)


@dataclass
class LinearModel:
    weights: Any  # DIM long: a float array, or the shipped model's int16 weights (times `scale`)
    intercept: float
    version: int = 0
    samples: int = 0
    scale: float = 1.0

    def margin(self, hashes: list[int]) -> float:
        """The sum of the message's columns' weights over the square root of their number, plus the intercept."""
        return self.column_margin({(h & 0xFFFFFFFF) % DIM for h in hashes})

    def column_margin(self, cols: set[int]) -> float:
        """margin() of the message's set of feature columns."""
        if not cols:
            return self.intercept
        w = self.weights
        return float(sum(map(w.__getitem__, cols))) * self.scale / len(cols) ** 0.5 + self.intercept

    def probability(self, hashes: list[int]) -> float:
        """Spam probability of a message given its token hashes."""
        return self.column_probability({(h & 0xFFFFFFFF) % DIM for h in hashes})

    def column_probability(self, cols: set[int]) -> float:
        """probability() of the message's set of feature columns."""
        z = self.column_margin(cols)
        return 1.0 / (1.0 + math.exp(-SCALE * max(min(z, 50.0), -50.0)))


# ---------------------------------------------------------------- the shipped model's tokens

# Header tokens (learn/tokens.header_tokens) that say "list mail" or "this site's relays".
LIST_TOKEN_PREFIXES = ("h:list-id:", "h:precedence:", "h:sender:", "h:return-path:", "h:received:")
# Words of the footers list managers append.
SHIPPED_WORDS = 1000  # words of the text the shipped model reads
LIST_FOOTER_WORDS = ("mailing list", "mailing _ list", "listinfo", "mailman")
# Headers a list manager adds; their values name the list.
LIST_HEADERS = ("List-Id", "List-Post", "List-Unsubscribe", "List-Subscribe", "List-Archive", "List-Help",
                "List-Owner", "Mailing-List", "X-BeenThere", "X-Mailing-List", "Errors-To")


def list_identity(msg: "Message") -> list[str]:
    """The names and hosts of the lists a message came through (lowercase), from its list headers."""
    import re

    names: set[str] = set()
    for header in LIST_HEADERS:
        for value in msg.header_values(header):
            for addr in re.findall(r"[\w.+-]+@[\w.-]+|<[^<>@\s]+>|https?://[\w.-]+", value.lower()):
                addr = addr.strip("<>")
                if addr.startswith("http"):
                    host = addr.split("://", 1)[1]
                    names.add(host)
                    continue
                local, _, host = addr.partition("@")
                if not host:  # a List-Id: <name.host>
                    local, _, host = addr.partition(".")
                for suffix in ("-request", "-bounces", "-owner", "-leave", "-join"):
                    local = local.split("+", 1)[0].removesuffix(suffix)
                if len(local) >= 4:
                    names.add(local)
                if host:
                    names.add(host)
    return sorted(n for n in names if len(n) >= 4)


def mark_words(identity: list[str]) -> list[str]:
    """What marks a token as naming the list: its names and hosts, the host's own label, list footers."""
    hosts = [n.split(".")[-2] for n in identity if n.count(".") >= 1 and len(n.split(".")[-2]) >= 4]
    return [*identity, *hosts, *LIST_FOOTER_WORDS]


def shipped_tokens(msg: "Message", pieces: "Pieces | None" = None) -> list[str]:
    """The tokens the shipped model sees: those of learn.tokens without the pairs of words (OSB),
    at most SHIPPED_WORDS words of text, and without what says "mailing list": tokens starting
    with LIST_TOKEN_PREFIXES, and in list mail those holding one of its mark_words().

    PIECES (learn.tokens.Pieces of the same message) are reused when given: a message
    tokenized for Bayes or the site's classifier is not read again."""
    from milterguard.learn import tokens as tk

    seq, identity = _shipped_sequence(msg, pieces if pieces is not None else tk.Pieces(msg))
    tokens = list(dict.fromkeys(seq))
    return _without_marks(tokens, mark_words(identity)) if identity else tokens


def _shipped_sequence(msg: "Message", p: "Pieces") -> tuple[list[str], list[str]]:
    """The shipped model's tokens before the list names are taken out (with repeats), and the list's names."""
    # Only header tokens can start with
    # LIST_TOKEN_PREFIXES (the others start with s:, c:, st:, u: or are words, which hold no
    # colon but in n: and sk:), and the list names are looked for only in list mail.
    seq = [*p.subject, *(t for t in p.head if not t.startswith(LIST_TOKEN_PREFIXES)), *p.body(SHIPPED_WORDS)]
    return seq, list_identity(msg)


def shipped_columns(msg: "Message", pieces: "Pieces | None" = None) -> set[int]:
    """The feature columns of shipped_hashes(msg) as LinearModel.margin() makes them, for
    LinearModel.column_probability(): the same set, without the tokens' order (CRC-32 has
    32 bits and DIM is a power of two, so a column is the CRC's low bits)."""
    from milterguard.learn import tokens as tk

    seq, identity = _shipped_sequence(msg, pieces if pieces is not None else tk.Pieces(msg))
    tokens = set(seq)
    if identity:
        tokens = _without_marks(list(tokens), mark_words(identity))
    crc32, mask = zlib.crc32, DIM - 1
    return {crc32(t.encode("utf-8", "surrogatepass")) & mask for t in tokens}


def _without_marks(tokens: list[str], marks: list[str]) -> list[str]:
    """TOKENS without those that hold one of MARKS: what a regular expression of the marks would
    tell token by token, found instead by str.find over all the tokens joined (each occurrence
    counts for the token it lies within), without a regular expression tried at every
    character of every token."""
    from bisect import bisect_right
    from itertools import accumulate

    joined = "\n".join(tokens)
    starts = list(accumulate((len(t) + 1 for t in tokens[:-1]), initial=0))
    marked: set[int] = set()
    find = joined.find
    for mark in marks:
        at = find(mark)
        while at >= 0:
            i = bisect_right(starts, at) - 1
            if at + len(mark) <= starts[i] + len(tokens[i]):
                marked.add(i)
            at = find(mark, at + 1)
    return [t for i, t in enumerate(tokens) if i not in marked] if marked else tokens


def shipped_hash(token: str) -> int:
    """The shipped model's own token hash (CRC-32): cheap, and independent of the hash Bayes stores by."""
    return zlib.crc32(token.encode("utf-8", "surrogatepass"))


def shipped_hashes(msg: "Message", pieces: "Pieces | None" = None) -> list[int]:
    crc32 = zlib.crc32
    return [crc32(t.encode("utf-8", "surrogatepass")) for t in shipped_tokens(msg, pieces)]


# ---------------------------------------------------------------- the file

def write_model(path: str, model: LinearModel, meta: dict[str, Any]) -> str:
    """Write MODEL as a model file (same model, same bytes); its SHA-256.

    The weights are kept as DIM int16 numbers and one scale (the largest
    weight over 32767), zlib-packed: read back without numpy, 2 MB in memory."""
    import numpy as np

    weights = np.asarray(model.weights, dtype=np.float64) * model.scale
    top = float(np.abs(weights).max()) or 1.0
    scale = float(np.float32(top / 32767))
    q = np.round(weights / scale).astype("<i2")
    header = json.dumps({"dim": DIM, "intercept": model.intercept, "samples": model.samples, "scale": scale,
                         "nonzero": int(np.count_nonzero(q)), **meta}, sort_keys=True).encode()
    data = MAGIC + struct.pack("<I", len(header)) + header + zlib.compress(q.tobytes(), 9)
    with open(path, "wb") as out:
        out.write(data)
    return hashlib.sha256(data).hexdigest()


def read_model(path: str) -> tuple[LinearModel, dict[str, Any]]:
    """The model in the file at PATH and its header; ValueError when it is not one."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise ValueError(f"{path}: not a milterguard model file")
    (size,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(data[start:start + size])
        raw = zlib.decompress(data[start + size:])
        if header.get("dim") != DIM or len(raw) != 2 * DIM:
            raise ValueError(f"model of another shape (dim {header.get('dim')}, {len(raw)} bytes)")
        intercept, scale, samples = float(header["intercept"]), float(header["scale"]), int(header["samples"])
    except (ValueError, KeyError, TypeError, zlib.error) as exc:
        raise ValueError(f"{path}: damaged model file ({exc})") from None
    if sys.byteorder != "little":  # pragma: no cover - the file is little-endian
        import array

        swapped = array.array("h", raw)
        swapped.byteswap()
        raw = swapped.tobytes()
    return LinearModel(memoryview(raw).cast("h"), intercept, 0, samples, scale), header


_SHIPPED: dict[str, LinearModel | None] = {}
_LOCK = threading.Lock()


def shipped_model(path: str = SHIPPED_MODEL) -> LinearModel | None:
    """The shipped model, read once per process (None when the file is missing or unreadable)."""
    model = _SHIPPED.get(path, False)
    if model is not False:
        return model  # type: ignore[return-value]
    with _LOCK:
        if path not in _SHIPPED:
            import logging

            try:
                _SHIPPED[path] = read_model(path)[0]
            except (OSError, ValueError, KeyError) as exc:
                logging.getLogger("milterguard.learn").error("shipped model cannot be read (%s): not used", exc)
                _SHIPPED[path] = None
    return _SHIPPED[path]
