"""Bayes: token counts in Redis and Robinson/Fisher chi-square combining.

Redis layout (all keys under `redis.prefix`):

- `bayes:t:BB`, where BB is two bytes (65536 keys): a hash whose fields are
  tokens and whose values are both counts in one integer,
  `spam * 2**32 + ham`.  A token is the 64-bit BLAKE2b hash of its text:
  its first 2 bytes are the BB of its hash key (raw bytes: building the key
  name costs the scripts half as much as a decimal number would), the next
  5 bytes are the field.  Small hashes are stored by Redis
  as compact listpacks (about 20 bytes a token, against some 90 for a key
  per token), and one HINCRBY moves a token's count for either class.
- `bayes:totals`: hash `spam`, `ham`: messages learned of each class.
- `bayes:digests`: hash message digest -> `spam` / `ham`: what was learned,
  cluster-wide, so learning a message twice counts once, and relearning it
  as the other class moves its counts.
- `ml:samples` (hash digest -> packed token hashes) and `ml:order` (list of
  digests, newest first): what `milterguard train` learns the classifier
  from, capped at `ml.max_samples`.

Learning a message is one Lua script on the master (atomic, one round
trip); classifying reads all of a message's tokens with one read-only
script on a replica (one round trip); a message's tokens go to either script as one string of
7 bytes per token, which costs the client far less than an argument each.
With `bayes.cache_slots` set, the tokens read within `bayes.cache_ttl` come
from the process's token cache (stores/bayes_cache.py) and only the others
are sent; the totals are read every time.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np
import redis

from milterguard.learn.linear import token_hash, token_hashes
from milterguard.learn.tokens import tokenize
from milterguard.clients.redis_client import Pending, RedisStore, RedisUnavailable
from milterguard.stores.bayes_cache import TokenCache

if TYPE_CHECKING:  # pragma: no cover
    from milterguard.mail.message import Message

SPAM_UNIT = 1 << 32  # a spam count is worth this much in a token's value
BUCKETS = 1 << 16
ROBINSON_S, ROBINSON_X = 1.0, 0.5  # strength and prior of an unknown token (Robinson)
MIN_STRENGTH = 0.1  # tokens closer than this to 0.5 are left out
MAX_SIGNIFICANT = 150  # the most telling tokens that are combined (as SpamAssassin does)

_LEARN = """
local prev = redis.call('HGET', KEYS[1], ARGV[1])
local label = ARGV[2]
if prev == label or (label == '' and not prev) or (prev and ARGV[7] == '1') then return 0 end
local function unit(cls) if cls == 'spam' then return 4294967296 else return 1 end end
local delta = 0
if prev then
  delta = delta - unit(prev)
  redis.call('HINCRBY', KEYS[2], prev, -1)
end
if label ~= '' then
  delta = delta + unit(label)
  redis.call('HINCRBY', KEYS[2], label, 1)
  redis.call('HSET', KEYS[1], ARGV[1], label)
  if ARGV[4] ~= '' then
    redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
    if not prev then redis.call('LPUSH', KEYS[4], ARGV[1]) end
    local max = tonumber(ARGV[5])
    while redis.call('LLEN', KEYS[4]) > max do
      redis.call('HDEL', KEYS[3], redis.call('RPOP', KEYS[4]))
    end
  end
else
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('LREM', KEYS[4], 1, ARGV[1])
end
local d = string.format('%d', delta)
local blob, prefix, sub, call = ARGV[6], ARGV[3], string.sub, redis.call
for i = 1, #blob, 7 do
  local key, field = prefix .. sub(blob, i, i + 1), sub(blob, i + 2, i + 6)
  if call('HINCRBY', key, field, d) <= 0 then call('HDEL', key, field) end
end
if prev then return 2 end
return 1
"""

_FETCH = """
local totals = redis.call('HMGET', KEYS[1], 'spam', 'ham')
local out = {totals[1] or '0', totals[2] or '0'}
local blob, prefix, sub, call = ARGV[2], ARGV[1], string.sub, redis.call
for i = 1, #blob, 7 do
  out[#out + 1] = call('HGET', prefix .. sub(blob, i, i + 1), sub(blob, i + 2, i + 6)) or '0'
end
return table.concat(out, ' ')
"""

_SHA_FETCH = hashlib.sha1(_FETCH.encode()).hexdigest()
_SHA_LEARN = hashlib.sha1(_LEARN.encode()).hexdigest()


def slots_blob(hashes) -> bytes:
    """Tokens as the scripts read them: 7 bytes each, 2 of hash key number and 5 of field
    (the hash's top 56 bits, big-endian)."""
    top = (np.asarray(hashes, dtype=np.uint64) >> np.uint64(8)).astype(">u8")
    return top.view(np.uint8).reshape(-1, 8)[:, 1:].tobytes()


def message_digest(msg: "Message") -> str:
    """What identifies a message across deliveries: Message-ID, Subject and text."""
    digest = hashlib.sha256()
    for piece in (msg.message_id, msg.subject, msg.text):
        digest.update(piece.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def pack_sample(hashes: Iterable[int]) -> bytes:
    """Token hashes as the classifier stores them: low 32 bits, zlib-packed."""
    values = sorted({h & 0xFFFFFFFF for h in hashes})
    return zlib.compress(struct.pack(f"<{len(values)}I", *values), 6)


def unpack_sample(data: bytes) -> list[int]:
    raw = zlib.decompress(data)
    return list(struct.unpack(f"<{len(raw) // 4}I", raw))


def _chi2q(x2: float, dof: int) -> float:
    """P(chi-square with an even `dof` >= x2)."""
    m = x2 / 2.0
    term = total = math.exp(-m)
    for i in range(1, dof // 2):
        term *= m / i
        total += term
    return min(total, 1.0)


def combine(counts: list[tuple[int, int]], n_spam: int, n_ham: int) -> tuple[float, int]:
    """(spam probability, tokens used) by Robinson's f(w) and Fisher's chi-square."""
    pairs = np.asarray(counts, dtype=np.int64).reshape(-1, 2)
    return combine_arrays(pairs[:, 0], pairs[:, 1], n_spam, n_ham)


def combine_arrays(spam: np.ndarray, ham: np.ndarray, n_spam: int, n_ham: int) -> tuple[float, int]:
    """combine() on arrays of spam and ham counts per token, without a Python loop per token.

    Each token's f(w) is the same IEEE arithmetic as a loop would do, the
    most telling ones are chosen by a stable sort as Python's would choose
    them, and their logarithms are summed in that order: the same result to
    the last bit."""
    if n_spam <= 0 or n_ham <= 0:
        return 0.5, 0
    n = spam + ham
    seen = n > 0
    spam, ham, n = spam[seen], ham[seen], n[seen].astype(np.float64)
    spam_ratio, ham_ratio = spam / n_spam, ham / n_ham
    p = spam_ratio / (spam_ratio + ham_ratio)
    f = (ROBINSON_S * ROBINSON_X + n * p) / (ROBINSON_S + n)
    strength = np.abs(f - 0.5)
    f, strength = f[strength >= MIN_STRENGTH], strength[strength >= MIN_STRENGTH]
    if not len(f):
        return 0.5, 0
    probs = f[np.argsort(-strength, kind="stable")[:MAX_SIGNIFICANT]].tolist()
    n = len(probs)
    ham_evidence = _chi2q(-2.0 * sum(math.log(f) for f in probs), 2 * n)
    spam_evidence = _chi2q(-2.0 * sum(math.log(1.0 - f) for f in probs), 2 * n)
    return (1.0 + ham_evidence - spam_evidence) / 2.0, n


@dataclass
class Lookup:
    """A Bayes look-up sent to Redis (Bayes.send_fetch), its reply not read yet."""

    pending: Pending
    blob: bytes  # the tokens asked for, as the script reads them
    hashes: np.ndarray  # all of the message's token hashes (uint64)
    cache: "TokenCache | None"
    found: tuple | None  # TokenCache.get() of the hashes, with the cache on


@dataclass
class Learned:
    """What one learn call did: 'learned', 'relearned', 'unlearned' or 'known'."""

    digest: str
    outcome: str


class Bayes:
    """The token database of one RedisStore."""

    def __init__(self, store: RedisStore, max_samples: int = 20000) -> None:
        self.store = store
        self.max_samples = max_samples
        self.totals_key = store.key("bayes", "totals")
        self.digests_key = store.key("bayes", "digests")
        self.token_prefix = store.key("bayes", "t", "").encode()
        self.samples_key = store.key("ml", "samples")
        self.order_key = store.key("ml", "order")
        self.cache_slots, self.cache_ttl = 0, 0.0
        self._cache: TokenCache | None = None

    def bucket_key(self, bucket: int) -> bytes:
        """The name of token hash number `bucket` (0..65535)."""
        return self.token_prefix + bucket.to_bytes(2, "big")

    # ------------------------------------------------------------ reading

    def fetch(self, hashes: list[int]) -> tuple[int, int, list[tuple[int, int]]]:
        """(spam learned, ham learned, (spam, ham) per token) in one round trip to a reader."""
        n_spam, n_ham, values = self.fetch_values(hashes)
        return n_spam, n_ham, list(zip((values >> 32).tolist(), (values & (SPAM_UNIT - 1)).tolist()))

    def send_fetch(self, hashes) -> "Lookup":
        """Send the look-up of these token hashes now; fetch_values(hashes, lookup) reads it.

        With the token cache on, only the tokens it does not hold fresh are asked
        for; the totals are asked for every time."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        cache = self.cache()
        if cache is None:
            ask, found = hashes, None
        else:
            found = cache.get(hashes >> np.uint64(8))
            ask = hashes[found[1]]
        blob = slots_blob(ask)
        pending = self.store.reader().send("EVALSHA_RO", _SHA_FETCH, 1, self.totals_key, self.token_prefix, blob)
        return Lookup(pending, blob, hashes, cache, found)

    def fetch_values(self, hashes, lookup: "Lookup | None" = None) -> tuple[int, int, np.ndarray]:
        """(spam learned, ham learned, each token's value `spam * 2**32 + ham` as int64)."""
        if lookup is None:
            lookup = self.send_fetch(hashes)
        try:
            reply = lookup.pending.result()
        except redis.exceptions.NoScriptError:
            reply = self.store.reader().eval_ro(_FETCH, 1, self.totals_key, self.token_prefix, lookup.blob)
        # Numbers separated by spaces: read by numpy's text parser, without a bytes object each.
        values = np.fromstring(reply, dtype=np.int64, sep=" ")
        if len(values) != 2 + len(lookup.blob) // 7:
            raise ValueError(f"the Bayes look-up answered {len(values)} numbers for {len(lookup.blob) // 7} tokens")
        n_spam, n_ham, asked = int(values[0]), int(values[1]), values[2:]
        if lookup.found is None:
            return n_spam, n_ham, asked
        cached, missing, stamp, generation = lookup.found
        cached[missing] = asked
        lookup.cache.fill(lookup.hashes[missing] >> np.uint64(8), asked, stamp, generation)
        return n_spam, n_ham, cached

    # ------------------------------------------------------------ the token cache

    def set_cache(self, slots: int, ttl: float) -> None:
        """Remember token values for `ttl` seconds in a table of `slots` entries per process
        (0 slots: off); see stores/bayes_cache.py."""
        if (slots, ttl) != (self.cache_slots, self.cache_ttl):
            self.cache_slots, self.cache_ttl, self._cache = slots, ttl, None

    def cache(self) -> "TokenCache | None":
        """This process's token cache (made on first use, and again in a forked child), or None."""
        if self.cache_slots <= 0 or self.cache_ttl <= 0:
            return None
        cache = self._cache
        if cache is None or cache.pid != os.getpid():
            cache = self._cache = TokenCache(self.cache_slots, self.cache_ttl)
        return cache

    def _forget(self, hashes) -> None:
        """Drop these tokens from this process's token cache: their counts are changing here."""
        cache = self._cache
        if cache is not None and cache.pid == os.getpid():
            cache.forget(np.asarray(hashes, dtype=np.uint64) >> np.uint64(8))

    def totals(self) -> tuple[int, int]:
        values = self.store.reader().hmget(self.totals_key, "spam", "ham")
        return int(values[0] or 0), int(values[1] or 0)

    def classify(self, tokens: list[str]) -> tuple[float, int, int, int]:
        """(spam probability, tokens used, spam learned, ham learned)."""
        return self.classify_hashes(token_hashes(tokens))

    def classify_hashes(self, hashes) -> tuple[float, int, int, int]:
        """classify() for token hashes already computed."""
        return self.classify_values(*self.fetch_values(hashes))

    @staticmethod
    def classify_values(n_spam: int, n_ham: int, values: np.ndarray) -> tuple[float, int, int, int]:
        """classify() for what fetch_values() read."""
        prob, used = combine_arrays(values >> 32, values & (SPAM_UNIT - 1), n_spam, n_ham)
        return prob, used, n_spam, n_ham

    # ------------------------------------------------------------ writing (master only)

    def learn(self, digest: str, tokens: list[str], label: str, sample: bool = True, only_new: bool = False) -> Learned:
        """Learn a message as 'spam' or 'ham', or forget it with label ''.

        Atomic on the master: the digest decides whether this is new, a
        repeat (nothing changes) or a relearn (the counts move class).
        With `only_new` a message learned before is left as it is
        (autolearn never overrules what an operator taught).
        """
        if label not in ("spam", "ham", ""):
            raise ValueError(f"label must be spam, ham or empty, got {label!r}")
        hashes = token_hashes(tokens)
        # Before and after: a look-up of this process sent meanwhile does not keep the old counts.
        self._forget(hashes)
        packed = pack_sample(hashes) if sample and label else b""
        args = (digest, label, self.token_prefix, packed, self.max_samples, slots_blob(hashes),
                "1" if only_new else "0")
        keys = (self.digests_key, self.totals_key, self.samples_key, self.order_key)
        writer = self.store.writer()
        try:
            result = writer.evalsha(_SHA_LEARN, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            result = writer.eval(_LEARN, len(keys), *keys, *args)
        self._forget(hashes)
        outcome = {0: "known", 1: "learned", 2: "relearned"}[int(result)]
        if not label and outcome != "known":
            outcome = "unlearned"
        return Learned(digest, outcome)

    def learn_message(self, msg: "Message", label: str) -> Learned:
        return self.learn(message_digest(msg), tokenize(msg), label)

    def unlearn_message(self, msg: "Message") -> Learned:
        return self.learn(message_digest(msg), tokenize(msg), "")

    # ------------------------------------------------------------ maintenance

    def stats(self) -> dict:
        """Messages learned, tokens stored and Redis memory of the token hashes."""
        reader = self.store.reader()
        n_spam, n_ham = self.totals()
        pipe = reader.pipeline()
        for bucket in range(BUCKETS):
            pipe.hlen(self.bucket_key(bucket))
        tokens = sum(pipe.execute())
        info = reader.info("memory")
        return {
            "spam": n_spam, "ham": n_ham, "tokens": tokens,
            "digests": reader.hlen(self.digests_key), "samples": reader.hlen(self.samples_key),
            "used_memory": info.get("used_memory", 0), "server": reader.name,
        }

    def expire(self, max_tokens: int, batch: int = 512) -> dict:
        """Keep at most `max_tokens` tokens: drop the rarest ones first.

        Tokens seen once are dropped first, then twice, and so on, until the
        count fits; a token's class balance does not matter, only how often
        it was seen (rare tokens carry the least evidence).
        """
        writer = self.store.writer()
        pipe = writer.pipeline()
        for bucket in range(BUCKETS):
            pipe.hlen(self.bucket_key(bucket))
        total = sum(pipe.execute())
        removed = 0
        limit = 1
        while total - removed > max_tokens and limit < 1 << 20:
            for start in range(0, BUCKETS, batch):
                pipe = writer.pipeline()
                keys = [self.bucket_key(b) for b in range(start, min(start + batch, BUCKETS))]
                for key in keys:
                    pipe.hgetall(key)
                contents = pipe.execute()
                drop = writer.pipeline()
                for key, fields in zip(keys, contents):
                    rare = [f for f, v in fields.items() if sum(divmod(int(v), SPAM_UNIT)) <= limit]
                    if rare:
                        drop.hdel(key, *rare)
                        removed += len(rare)
                drop.execute()
                if total - removed <= max_tokens:
                    break
            limit *= 2
        return {"tokens_before": total, "removed": removed, "tokens": total - removed}


__all__ = ["Bayes", "Learned", "RedisUnavailable", "combine", "combine_arrays", "message_digest", "token_hash", "token_hashes", "slots_blob",
           "pack_sample", "unpack_sample"]
