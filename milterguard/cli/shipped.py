"""The shipped model: built from a corpus on disk, without Redis (`milterguard train --corpus`).

A corpus is a directory whose sub-directories named `spam` hold spam and
those named `ham` or `hard_ham` hold ham (at any depth, e.g.
`spamassassin/spam`, `modern/ham`).  The train split of each (the fixed
split of `milterguard.corpus`, or `--time-split`: all but the newest
quarter by Date header) is tokenized as the shipped model sees mail
(`learn.linear.shipped_tokens`: the shared tokens without word pairs, list
headers, list names or list footers), and the classifier of
`stores/models.fit` is fitted on it.  The same corpus gives the same file,
byte for byte.  Next to the model goes its provenance (JSON): what it was
trained on, the command, the licences stated in each source's SOURCE.md,
and the model file's SHA-256.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass

from milterguard import __version__
from milterguard.corpus import Progress, split_of
from milterguard.learn import linear
from milterguard.mail.message import Message
from milterguard.mail.raw import read_message

HAM_DIRS = ("ham", "hard_ham")
# The model's own regularisation: stronger than a site's (DEFAULT_ALPHA 1e-4), so that it
# leans on what many messages share rather than on one campaign's words.
SHIPPED_ALPHA = 3e-4
# Weights smaller than this (of a largest of about 1) are left out of the file.
PRUNE = 2e-3


@dataclass
class Sample:
    path: str
    source: str  # the corpus sub-directory it came from, e.g. "modern"
    label: int  # 1 spam, 0 ham
    date: float  # the Date header as a timestamp, 0 when missing


def corpus_samples(root: str) -> list[Sample]:
    """Every message under ROOT's spam / ham / hard_ham directories, in a fixed order."""
    found: list[Sample] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        name = os.path.basename(dirpath)
        if name != "spam" and name not in HAM_DIRS:
            continue
        source = os.path.relpath(os.path.dirname(dirpath), root).split(os.sep)[0]
        for fn in sorted(filenames):
            if fn.startswith(".") or fn.upper().startswith("SOURCE"):
                continue
            found.append(Sample(os.path.join(dirpath, fn), source if source != "." else name, int(name == "spam"), 0.0))
    return found


def message_date(msg: Message) -> float:
    try:
        value = email.utils.parsedate_to_datetime(msg.header("Date") or "")
        return value.timestamp() if value else 0.0
    except (TypeError, ValueError, OverflowError):
        return 0.0


def tokens_of(path: str) -> tuple[list[int], float]:
    """(token hashes as the shipped model sees them, Date timestamp) of one message file."""
    msg = Message.from_bytes(read_message(path))
    return linear.shipped_hashes(msg), message_date(msg)


def newest_quarter(samples: list[Sample]) -> set[str]:
    """The paths of the newest quarter of SAMPLES by Date (ties by path)."""
    ordered = sorted(samples, key=lambda s: (s.date, s.path))
    return {s.path for s in ordered[len(ordered) - len(ordered) // 4:]}


def load_corpus(root: str, progress: bool | None = None) -> tuple[list[Sample], dict[str, list[int]]]:
    samples = corpus_samples(root)
    if not samples:
        raise ValueError(f"{root}: no spam/, ham/ or hard_ham/ directory with messages")
    bar = Progress(len(samples), "tokenizing", enabled=progress)
    hashes: dict[str, list[int]] = {}
    for s in samples:
        try:
            hashes[s.path], s.date = tokens_of(s.path)
        except (OSError, ValueError) as exc:
            print(f"milterguard: {s.path}: {exc}", file=sys.stderr)
        bar.step()
    return [s for s in samples if s.path in hashes], hashes


def training_set(samples: list[Sample], split: str) -> list[Sample]:
    """The samples a model is fitted on: the 'train' split, or with 'time' all but the newest quarter
    of each source and class."""
    if split == "train":
        return [s for s in samples if split_of(s.path) == "train"]
    if split == "time":
        newest: set[str] = set()
        for key in {(s.source, s.label) for s in samples}:
            newest |= newest_quarter([s for s in samples if (s.source, s.label) == key])
        return [s for s in samples if s.path not in newest]
    return list(samples)


def fit_samples(chosen: list[Sample], hashes: dict[str, list[int]], alpha: float = SHIPPED_ALPHA) -> linear.LinearModel:
    import numpy as np

    from milterguard.stores.models import fit

    rows = [linear.columns(hashes[s.path]) for s in chosen]
    model = fit(rows, [s.label for s in chosen], alpha=alpha)
    weights = model.weights.copy()
    weights[np.abs(weights) < PRUNE] = 0.0
    return linear.LinearModel(weights, round(model.intercept, 6), 0, model.samples)


def licences(root: str) -> dict[str, list[str]]:
    """The sentences of each source's SOURCE.md that state a licence."""
    out: dict[str, list[str]] = {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "SOURCE.md")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            text = re.sub(r"\n(?![\n|#-])", " ", text)  # wrapped lines joined
            found = [m.strip(" -") for m in re.split(r"(?<=\.)\s+|\n", text)
                     if re.search(r"licen[cs]e|Apache-2\.0|CC BY", m, re.I)]
            out[name] = found
    return out


def build(root: str, output: str, split: str = "train", alpha: float = SHIPPED_ALPHA,
          progress: bool | None = None, command: str = "") -> dict:
    """Fit the shipped model on ROOT, write it to OUTPUT and its provenance next to it; the provenance."""
    samples, hashes = load_corpus(root, progress)
    chosen = training_set(samples, split)
    model = fit_samples(chosen, hashes, alpha)
    sha = linear.write_model(output, model, {"alpha": alpha, "split": split})
    counts: dict[str, dict[str, int]] = {}
    for s in chosen:
        c = counts.setdefault(s.source, {"spam": 0, "ham": 0})
        c["spam" if s.label else "ham"] += 1
    dates = sorted(s.date for s in chosen if s.date)
    chosen_paths = {s.path for s in chosen}
    held_out = [s for s in samples if s.path not in chosen_paths]
    provenance = {
        "model": os.path.basename(output),
        "sha256": sha,
        "milterguard": __version__,
        "command": command,
        "trained_on": counts,
        "split": split,
        "alpha": alpha,
        "nonzero_weights": int((model.weights != 0).sum()),
        "newest_message": email.utils.formatdate(dates[-1], usegmt=True) if dates else None,
        "token_fingerprint": token_fingerprint(),
        "tokens": "learn.linear.shipped_tokens (no word pairs, list headers, list names or footers), CRC-32",
        "licences": licences(root),
        "built": time.strftime("%Y-%m-%d", time.gmtime()),
        "figures_held_out": figures(model, held_out, hashes),
    }
    path = provenance_path(output)
    with open(path, "w", encoding="utf-8") as out:
        json.dump(provenance, out, indent=1, sort_keys=True)
        out.write("\n")
    return provenance


def figures(model: linear.LinearModel, held_out: list[Sample], hashes: dict[str, list[int]]) -> dict:
    """The model alone on the held-out messages of each source: counts, ROC AUC, spam missed at 0.1 % and 1 % FP."""
    from milterguard.cli.evaluate import summarise

    out = {}
    for source in sorted({s.source for s in held_out}):
        part = [s for s in held_out if s.source == source]
        labels = [s.label for s in part]
        if len(set(labels)) < 2:
            continue
        probs = [model.probability(hashes[s.path]) for s in part]
        out[source] = {"spam": sum(labels), "ham": len(labels) - sum(labels), **summarise(labels, probs)}
    return out


# A message whose tokens stand for the tokenizer: when they change, the model must be rebuilt.
FINGERPRINT_MESSAGE = (
    b"From: \"Service Desk\" <help@example.com>\nTo: user@example.org\nSubject: Your mailbox is FULL!\n"
    b"Date: Mon, 02 Jan 2023 10:00:00 +0000\nMessage-ID: <a1b2c3@example.com>\nList-Id: <team.lists.example.net>\n"
    b"MIME-Version: 1.0\nContent-Type: text/html; charset=utf-8\n\n"
    b"<p>Dear user, verify your account at <a href=\"https://login.example.net/x?id=12345678\">our portal</a> "
    b"within 24 hours or lose $100 of stored mail. Caf\xc3\xa9 na\xc3\xafve.</p>"
    b"<p>team mailing list https://lists.example.net/mailman/listinfo/team</p>\n"
)


def token_fingerprint() -> str:
    """SHA-256 of the shipped model's token hashes of FINGERPRINT_MESSAGE: the provenance records it, and a
    test compares it with the tokenizer of the day, so that a model built for other tokens is noticed."""
    hashes = linear.shipped_hashes(Message.from_bytes(FINGERPRINT_MESSAGE))
    return hashlib.sha256(b"".join(h.to_bytes(4, "big") for h in hashes)).hexdigest()


def provenance_path(model_path: str) -> str:
    return os.path.splitext(model_path)[0] + ".json"


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
