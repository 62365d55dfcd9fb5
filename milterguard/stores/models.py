"""The learned classifier: a linear model on hashed tokens, shared through Redis.

Features are the tokens of `milterguard.learn.tokens` (words, OSB bigrams,
header, URL, attachment and structural tokens), each hashed into one of
`DIM` columns, a message's row scaled to unit length.  `milterguard train`
fits a linear model on the samples kept by learning (`ml:samples`) with
scikit-learn's SGDClassifier and the modified Huber loss (a logistic-like
loss that ignores what is already far on the right side; chosen over
LogisticRegression by 5-fold cross-validation on the train split of the
shared corpus, see docs/accuracy.md).  Stochastic gradient descent depends
on the order it visits the samples in, so the fit is repeated with each of
`SEEDS` and the weights are averaged: one linear model again (the same cost
to score), steadier than any single run.  The model is stored in Redis:

- `ml:model`: the non-zero weights (column indices and float32 values),
  the intercept and the version, zlib-packed;
- `ml:version`: a counter raised in the same transaction.

Every node polls `ml:version` (every `ml.poll_interval` seconds, from a
replica) and, when it changed, loads the new model and swaps it in with
one assignment: a message is scored by one model or the other, never a mix,
and no restart is needed.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np

from milterguard.stores.bayes import token_hash, unpack_sample
from milterguard.clients.redis_client import RedisStore, RedisUnavailable

log = logging.getLogger("milterguard.learn")

DIM = 1 << 20
DEFAULT_ALPHA = 1e-4
SEEDS = (1, 2, 3, 4, 5)  # the fits whose weights are averaged
# The classifier's margin z becomes a probability 1 / (1 + exp(-SCALE * z)):
# the modified Huber loss puts the two classes at z = -1 and z = +1, which
# this maps to 0.12 and 0.88.
SCALE = 2.0


def columns(hashes: list[int]) -> np.ndarray:
    """The feature columns of a message's token hashes (unique, sorted)."""
    low = np.asarray(hashes, dtype=np.uint64) & np.uint64(0xFFFFFFFF)
    return np.unique(low % np.uint64(DIM)).astype(np.int64)


@dataclass
class Model:
    weights: np.ndarray  # float32, DIM long
    intercept: float
    version: int
    samples: int = 0

    def probability(self, hashes: list[int]) -> float:
        """Spam probability of a message given its token hashes."""
        cols = columns(hashes)
        if len(cols) == 0:
            z = self.intercept
        else:
            z = float(self.weights[cols].sum()) / np.sqrt(len(cols)) + self.intercept
        return float(1.0 / (1.0 + np.exp(-SCALE * z)))

    def pack(self) -> bytes:
        nz = np.flatnonzero(self.weights).astype(np.uint32)
        buf = io.BytesIO()
        np.savez_compressed(buf, idx=nz, val=self.weights[nz].astype(np.float32),
                            meta=np.asarray([self.intercept, self.version, self.samples], dtype=np.float64))
        return buf.getvalue()

    @classmethod
    def unpack(cls, data: bytes) -> "Model":
        with np.load(io.BytesIO(data)) as npz:
            weights = np.zeros(DIM, dtype=np.float32)
            weights[npz["idx"].astype(np.int64)] = npz["val"]
            intercept, version, samples = npz["meta"]
        return cls(weights, float(intercept), int(version), int(samples))


def load_samples(store: RedisStore) -> tuple[list[np.ndarray], list[int]]:
    """(columns per sample, 1 for spam / 0 for ham) of every kept sample, from the master."""
    from milterguard.stores.bayes import Bayes

    bayes = Bayes(store)
    writer = store.writer()
    labels = {k: v for k, v in writer.hgetall(bayes.digests_key).items()}
    samples: dict[bytes, bytes] = {}
    cursor = 0
    while True:
        cursor, batch = writer.hscan(bayes.samples_key, cursor, count=1000)
        samples.update(batch)
        if cursor == 0:
            break
    rows, y = [], []
    # In digest order: Redis returns a hash in an order seeded per server, and
    # the fit depends on the order, so the same samples give the same model.
    for digest in sorted(samples):
        label = labels.get(digest)
        if label not in (b"spam", b"ham"):
            continue
        rows.append(columns(unpack_sample(samples[digest])))
        y.append(1 if label == b"spam" else 0)
    return rows, y


def fit(rows: list[np.ndarray], y: list[int], alpha: float = DEFAULT_ALPHA, version: int = 0) -> Model:
    """Fit the linear model on hashed, unit-length binary rows (deterministic: fixed seeds, averaged)."""
    from scipy.sparse import csr_matrix
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import SGDClassifier

    if len(set(y)) < 2:
        raise ValueError("training needs both spam and ham samples")
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(r) for r in rows])
    indices = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    data = np.concatenate([np.full(len(r), 1.0 / np.sqrt(max(len(r), 1)), dtype=np.float64) for r in rows])
    x = csr_matrix((data, indices, indptr), shape=(len(rows), DIM))
    weights = np.zeros(DIM, dtype=np.float64)
    intercept = 0.0
    for seed in SEEDS:
        clf = SGDClassifier(loss="modified_huber", alpha=alpha, class_weight="balanced", max_iter=100, tol=1e-4,
                            random_state=seed)
        with warnings.catch_warnings():
            # A few dozen samples (a new site, the tests) may not settle within
            # max_iter; the model is still usable and the next train improves it.
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(x, np.asarray(y))
        weights += clf.coef_[0]
        intercept += float(clf.intercept_[0])
    return Model((weights / len(SEEDS)).astype(np.float32), intercept / len(SEEDS), version, len(rows))


def train(store: RedisStore, alpha: float = DEFAULT_ALPHA) -> Model:
    """Fit on the kept samples and publish the model as the next version."""
    rows, y = load_samples(store)
    writer = store.writer()
    version = int(writer.get(store.key("ml", "version")) or 0) + 1
    model = fit(rows, y, alpha=alpha, version=version)
    publish(store, model)
    return model


def publish(store: RedisStore, model: Model) -> None:
    """Store the model and raise the version in one transaction."""
    with store.writer().pipeline(transaction=True) as pipe:
        pipe.set(store.key("ml", "model"), model.pack())
        pipe.set(store.key("ml", "version"), model.version)
        pipe.execute()


class ModelCache:
    """The current model of one store, reloaded when its version changes."""

    def __init__(self, store: RedisStore, poll_interval: float) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self.model: Model | None = None
        self._checked = float("-inf")
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def current(self) -> Model | None:
        """The model to score with; asks Redis for the version at most every poll_interval.

        The first model is loaded at once; later versions are loaded in a
        background thread while the old one keeps scoring, so no message
        waits for a load.  Raises RedisUnavailable only when no model was
        ever loaded and Redis cannot be asked: a loaded model keeps serving
        through an outage.
        """
        if self._pid != os.getpid():
            # A worker forked while the supervisor was loading: the loading
            # thread did not come along, its lock must not stay held here.
            self._pid, self._lock, self._checked = os.getpid(), threading.Lock(), float("-inf")
        now = time.monotonic()
        if now - self._checked < self.poll_interval:
            return self.model
        if not self._lock.acquire(blocking=False):
            return self.model  # another thread is polling or loading
        self._checked = now
        try:
            version = int(self.store.reader().get(self.store.key("ml", "version")) or 0)
        except RedisUnavailable:
            self._lock.release()
            if self.model is None:
                raise
            return self.model
        if not version or (self.model is not None and version == self.model.version):
            self._lock.release()
        elif self.model is None:
            try:
                self._load()
            finally:
                self._lock.release()
        else:
            threading.Thread(target=self._load_in_background, name="model-load", daemon=True).start()
        return self.model

    def _load(self) -> None:
        data = self.store.reader().get(self.store.key("ml", "model"))
        if not data:
            return
        try:
            model = Model.unpack(data)
        except (OSError, ValueError, KeyError) as exc:
            log.error("classifier model in Redis cannot be read (%s): keeping the one loaded", exc)
            return
        self.model = model  # one assignment: a message is scored by the old model or the new one
        log.info("classifier model version %d loaded (%d samples)", model.version, model.samples)

    def _load_in_background(self) -> None:
        try:
            self._load()
        except RedisUnavailable:
            pass  # logged once by the store; the next poll tries again
        finally:
            self._lock.release()


_CACHES: dict[int, ModelCache] = {}


def model_cache(store: RedisStore, poll_interval: float) -> ModelCache:
    cache = _CACHES.get(id(store))
    if cache is None or cache.store is not store:
        cache = _CACHES[id(store)] = ModelCache(store, poll_interval)
    cache.poll_interval = poll_interval
    return cache


__all__ = ["DIM", "Model", "ModelCache", "columns", "fit", "load_samples", "model_cache", "publish", "token_hash", "train"]
