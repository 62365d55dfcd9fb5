"""Content hashes of reported spam, kept in Redis (milterguard/clients/redis_client.py).

Two hashes of a message's text (HTML reduced to text):

- the exact hash: SHA-256 of the normalised text (lower case, each run of
  digits made one `#`, white space collapsed), so that a resend with other
  line breaks or other numbers is the same message;
- a 64-bit SimHash of its word 3-shingles (same normalisation): texts that
  share most of their shingles get hashes a few bits apart, and the
  Hamming distance between two hashes measures how far the texts are.

Keys (under redis.prefix)::

    fuzzy:h:<exact hash>          -> the SimHash, with an expiry (fuzzy.ttl)
    fuzzy:b:<band>:<8 bits>       sorted set: SimHash -> expiry time

Each SimHash is filed under its eight 8-bit bands: two hashes at most 7 bits
apart share at least one band whole (pigeonhole), so a look-up reads eight
small sets in one round trip (one read-only script: the exact hash, else the
unexpired members of the bands) and compares only the hashes found there.
A look-up can be sent first and its reply read later (`send_lookup`).
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass

from milterguard.learn.linear import digests8

BANDS = 8
BAND_BITS = 64 // BANDS
MAX_DISTANCE = BANDS - 1  # what the band index can find
_DIGITS = re.compile(r"\d+")
_WORD = re.compile(r"[^\W_]+|#", re.UNICODE)


@dataclass(frozen=True)
class Digest:
    exact: str  # hex SHA-256 of the normalised text
    simhash: int  # 64 bits
    words: int

    @property
    def simhex(self) -> str:
        return f"{self.simhash:016x}"


def normalise(text: str) -> str:
    return " ".join(_DIGITS.sub("#", text.lower()).split())


def digest(text: str, min_words: int = 0) -> Digest | None:
    """The exact hash and the SimHash of TEXT; None for fewer than MIN_WORDS words
    (nothing is hashed then)."""
    norm = normalise(text)
    words = _WORD.findall(norm)
    if len(words) < min_words:
        return None
    exact = hashlib.sha256(norm.encode("utf-8", "surrogatepass")).hexdigest()
    return Digest(exact, simhash(words), len(words))


def simhash(words: list[str]) -> int:
    """64-bit SimHash of the word 3-shingles of WORDS (single words when there are fewer than 3)."""
    # numpy is imported here: checks import this module, and a scan without Redis loads no numpy.
    import numpy as np

    shingles = [f"{a} {b} {c}" for a, b, c in zip(words, words[1:], words[2:])] or words
    if not shingles:
        return 0
    digests = digests8(shingles)  # BLAKE2b, 8 bytes, of each shingle
    # Each bit's vote counted by numpy: a row of 64 bits per shingle, most significant first
    # (the digest read as a big-endian number), summed by column; a bit is set when more
    # than half of the shingles set it.
    bits = np.unpackbits(np.frombuffer(digests, dtype=np.uint8).reshape(len(shingles), 8), axis=1)
    votes = bits.sum(axis=0, dtype=np.int64)
    return int.from_bytes(np.packbits(2 * votes > len(shingles)).tobytes(), "big")


def distance(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def bands(value: int) -> list[str]:
    return [f"{i}:{(value >> (i * BAND_BITS)) & ((1 << BAND_BITS) - 1):02x}" for i in range(BANDS)]


# KEYS: the exact hash's key, then the bands'; ARGV[1]: now.  {1, simhash} for an exact
# match, else {0, members of the bands not expired...}.
_LOOKUP = """
local exact = redis.call('GET', KEYS[1])
if exact then return {1, exact} end
local out, n = {0}, 1
for i = 2, #KEYS do
  local members = redis.call('ZRANGEBYSCORE', KEYS[i], ARGV[1], '+inf')
  for j = 1, #members do n = n + 1; out[n] = members[j] end
end
return out
"""
_SHA_LOOKUP = hashlib.sha1(_LOOKUP.encode()).hexdigest()


@dataclass(frozen=True)
class Match:
    kind: str  # "exact" or "fuzzy"
    distance: int
    simhash: str  # the stored hash that matched


class FuzzyStore:
    """Exact and SimHash entries in a RedisStore."""

    def __init__(self, store, ttl: float) -> None:
        self.store = store
        self.ttl = int(ttl)

    def _keys(self, d: Digest) -> tuple[str, list[str]]:
        return self.store.key("fuzzy", "h", d.exact), [self.store.key("fuzzy", "b", b) for b in bands(d.simhash)]

    def add(self, d: Digest) -> None:
        """File D (again): its expiry starts anew. Raises RedisUnavailable."""
        exact_key, band_keys = self._keys(d)
        now = time.time()
        expires = now + self.ttl
        with self.store.writer().pipeline() as pipe:
            pipe.set(exact_key, d.simhex, ex=self.ttl)
            for key in band_keys:
                pipe.zadd(key, {d.simhex: expires})
                pipe.zremrangebyscore(key, "-inf", now)  # what expired meanwhile
                pipe.expire(key, self.ttl)
            pipe.execute()

    def delete(self, d: Digest) -> bool:
        """Remove D's exact entry and its SimHash; True when it was there."""
        exact_key, band_keys = self._keys(d)
        with self.store.writer().pipeline() as pipe:
            pipe.delete(exact_key)
            for key in band_keys:
                pipe.zrem(key, d.simhex)
            results = pipe.execute()
        return bool(results[0]) or any(results[1:])

    def send_lookup(self, d: Digest):
        """Send the look-up of D now; lookup(d, max_distance, pending) reads it."""
        exact_key, band_keys = self._keys(d)
        return self.store.reader().send("EVALSHA_RO", _SHA_LOOKUP, 1 + len(band_keys), exact_key, *band_keys,
                                        repr(time.time()))

    def lookup(self, d: Digest, max_distance: int, pending=None) -> Match | None:
        """The closest entry within MAX_DISTANCE bits, exact first. Raises RedisUnavailable."""
        # Imported here: a scan without Redis does not load the Redis client (checks import this module).
        from redis.exceptions import NoScriptError

        exact_key, band_keys = self._keys(d)
        reader = self.store.reader()
        try:
            if pending is None:
                reply = reader.evalsha_ro(_SHA_LOOKUP, 1 + len(band_keys), exact_key, *band_keys, repr(time.time()))
            else:
                reply = pending.result()
        except NoScriptError:
            reply = reader.eval_ro(_LOOKUP, 1 + len(band_keys), exact_key, *band_keys, repr(time.time()))
        if int(reply[0]) == 1:
            return Match("exact", 0, _text(reply[1]))
        best: Match | None = None
        for member in reply[1:]:
            text = _text(member)
            try:
                dist = distance(int(text, 16), d.simhash)
            except ValueError:
                continue
            if dist <= max_distance and (best is None or dist < best.distance):
                best = Match("fuzzy", dist, text)
        return best


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
