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
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

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
    """The 64-bit hash a token is stored and hashed into features by."""
    return int.from_bytes(hashlib.blake2b(token.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def token_hashes(tokens: list[str]) -> list[int]:
    """token_hash() of each token, without a Python call per token (the same values)."""
    blake2b, from_bytes = hashlib.blake2b, int.from_bytes
    return [from_bytes(blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big") for t in tokens]


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
        cols = {(h & 0xFFFFFFFF) % DIM for h in hashes}
        if not cols:
            return self.intercept
        w = self.weights
        return float(sum(w[c] for c in cols)) * self.scale / len(cols) ** 0.5 + self.intercept

    def probability(self, hashes: list[int]) -> float:
        """Spam probability of a message given its token hashes."""
        z = self.margin(hashes)
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


def shipped_filter(msg: "Message") -> "Callable[[str], bool]":
    """Whether the shipped model sees a token of MSG: not list headers, list names or list footers."""
    import re

    identity = list_identity(msg)
    if not identity:
        return lambda token: not token.startswith(LIST_TOKEN_PREFIXES)
    hosts = [n.split(".")[-2] for n in identity if n.count(".") >= 1 and len(n.split(".")[-2]) >= 4]
    marks = re.compile("|".join(re.escape(m) for m in (*identity, *hosts, *LIST_FOOTER_WORDS)))
    return lambda token: not token.startswith(LIST_TOKEN_PREFIXES) and marks.search(token) is None


def shipped_tokens(msg: "Message") -> list[str]:
    """The tokens the shipped model sees: those of learn.tokens without the pairs of words (OSB),
    at most SHIPPED_WORDS words of text, and without what says "mailing list" (shipped_filter)."""
    from milterguard.learn import tokens as tk

    subject = tk.words(msg.subject, 40)
    seq = ["s:" + w for w in subject]
    seq += tk.char_grams(msg.subject, "c:s:")
    seq += tk.char_grams(msg.from_name, "c:f:")
    seq += tk.header_tokens(msg)
    seq += tk.structure_tokens(msg)
    seq += tk.url_tokens(msg)
    seq += tk.words(msg.text, SHIPPED_WORDS)
    keep = shipped_filter(msg)
    return [t for t in dict.fromkeys(seq) if keep(t)]


def shipped_hash(token: str) -> int:
    """The shipped model's own token hash (CRC-32): cheap, and independent of the hash Bayes stores by."""
    return zlib.crc32(token.encode("utf-8", "surrogatepass"))


def shipped_hashes(msg: "Message") -> list[int]:
    return [shipped_hash(t) for t in shipped_tokens(msg)]


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
