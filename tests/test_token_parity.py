"""The token pipeline made cheaper gives the same answers: tokens, hashes, columns, the shipped
model's tokens and probability, and SimHash, on corpus messages, against the plain definitions."""

from __future__ import annotations

import hashlib
import math
import re
import zlib

import numpy as np
import pytest

from milterguard.learn import linear
from milterguard.learn import tokens as tk
from milterguard.mail.message import Message
from milterguard.mail.raw import iter_message_files, read_message
from milterguard.stores.bayes import slots_blob
from milterguard.stores.hashes import normalise, simhash
from milterguard.stores.models import Model
from support import corpus_dir

CORPORA = ("spamassassin/spam", "spamassassin/ham", "spamassassin/hard_ham", "modern/spam", "modern/ham")
EVERY = 12  # one message in EVERY of each corpus directory


def corpus_messages() -> list[tuple[str, Message]]:
    out = []
    for sub in CORPORA:
        paths = sorted(iter_message_files([str(corpus_dir() / sub)]))[::EVERY]
        out += [(p, Message.from_bytes(read_message(p))) for p in paths]
    return out


@pytest.fixture(scope="module")
def messages():
    found = corpus_messages()
    if len(found) < 100:
        pytest.skip("the shared corpus is not there")
    return found


# ---------------------------------------------------------------- the definitions


def tokens_by_definition(msg: Message) -> list[str]:
    subject = tk.words(msg.subject, 40)
    body = tk.words(msg.text)
    seq = ["s:" + w for w in subject]
    seq += [f"s:{b}" for b in tk.osb(subject)]
    seq += tk.char_grams(msg.subject, "c:s:")
    seq += tk.char_grams(msg.from_name, "c:f:")
    seq += tk.header_tokens(msg)
    seq += tk.structure_tokens(msg)
    seq += tk.url_tokens(msg)
    seq += body
    seq += tk.osb(body)
    return list(dict.fromkeys(seq))[:tk.MAX_TOKENS]


def shipped_tokens_by_definition(msg: Message) -> list[str]:
    seq = ["s:" + w for w in tk.words(msg.subject, 40)]
    seq += tk.char_grams(msg.subject, "c:s:")
    seq += tk.char_grams(msg.from_name, "c:f:")
    seq += tk.header_tokens(msg)
    seq += tk.structure_tokens(msg)
    seq += tk.url_tokens(msg)
    seq += tk.words(msg.text, linear.SHIPPED_WORDS)
    keep = shipped_filter_by_definition(msg)
    return [t for t in dict.fromkeys(seq) if keep(t)]


def shipped_filter_by_definition(msg: Message):
    """Whether the shipped model sees a token: not list headers, and in list mail nothing a
    regular expression of the list's marks finds."""
    identity = linear.list_identity(msg)
    if not identity:
        return lambda token: not token.startswith(linear.LIST_TOKEN_PREFIXES)
    marks = re.compile("|".join(re.escape(m) for m in linear.mark_words(identity)))
    return lambda token: not token.startswith(linear.LIST_TOKEN_PREFIXES) and marks.search(token) is None


def probability_by_definition(model: linear.LinearModel, hashes: list[int]) -> float:
    cols = {(h & 0xFFFFFFFF) % linear.DIM for h in hashes}
    z = float(sum(model.weights[c] for c in cols)) * model.scale / len(cols) ** 0.5 + model.intercept if cols \
        else model.intercept
    return 1.0 / (1.0 + math.exp(-linear.SCALE * max(min(z, 50.0), -50.0)))


def hash_by_definition(text: str) -> int:
    """The 64-bit hash of a token or shingle: its 8-byte BLAKE2b, read as a big-endian number."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def simhash_by_definition(words: list[str]) -> int:
    shingles = [f"{a} {b} {c}" for a, b, c in zip(words, words[1:], words[2:])] or words
    values = [hash_by_definition(s) for s in shingles]
    return sum(1 << bit for bit in range(64) if 2 * sum(v >> bit & 1 for v in values) > len(values))


# ---------------------------------------------------------------- the comparisons


def test_tokens_and_hashes_are_those_of_the_definition(messages):
    lists = 0
    for path, msg in messages:
        expected = tokens_by_definition(msg)
        pieces = tk.Pieces(msg)
        assert tk.tokenize(msg) == expected, path
        assert tk.tokenize(msg, pieces) == expected, path
        hashes = [hash_by_definition(t) for t in expected]
        assert [linear.token_hash(t) for t in expected] == hashes, path
        array = linear.token_hash_array(expected)
        assert array.dtype == np.uint64 and array.tolist() == hashes == linear.token_hashes(expected), path
        # What reads the hashes reads the array as it read the list.
        assert slots_blob(array) == slots_blob(hashes), path
        assert np.array_equal(linear.columns(array), linear.columns(hashes)), path
        # The shipped model's tokens, alone and from the pieces tokenize() made (fewer words of text).
        shipped = shipped_tokens_by_definition(msg)
        assert linear.shipped_tokens(msg) == shipped, path
        assert linear.shipped_tokens(msg, pieces) == shipped, path
        assert linear.shipped_hashes(msg, pieces) == [linear.shipped_hash(t) for t in shipped], path
        lists += bool(linear.list_identity(msg))
    assert 0 < lists < len(messages)  # list mail and other mail were both compared


def test_pieces_read_for_fewer_words_first_then_more_give_the_same_tokens(messages):
    for path, msg in messages[::5]:
        pieces = tk.Pieces(msg)
        assert linear.shipped_tokens(msg, pieces) == shipped_tokens_by_definition(msg), path
        assert tk.tokenize(msg, pieces) == tokens_by_definition(msg), path


def test_probabilities_are_the_same_to_the_last_bit(messages):
    shipped = linear.shipped_model()
    assert shipped is not None
    rng = np.random.default_rng(3)
    site = Model(rng.normal(0, 0.05, linear.DIM).astype(np.float32), -0.2, 1, 100)
    for path, msg in messages:
        tokens = tokens_by_definition(msg)
        hashes = [linear.token_hash(t) for t in tokens]
        assert site.probability(linear.token_hash_array(tokens)) == site.probability(hashes), path
        expected = [zlib.crc32(t.encode("utf-8", "surrogatepass")) for t in shipped_tokens_by_definition(msg)]
        assert shipped.probability(linear.shipped_hashes(msg, tk.Pieces(msg))) == probability_by_definition(
            shipped, expected), path
        # What the check scores: the set of columns, without the tokens' order.
        assert linear.shipped_columns(msg) == {h % linear.DIM for h in expected}, path
        assert shipped.column_probability(linear.shipped_columns(msg, tk.Pieces(msg))) == \
            probability_by_definition(shipped, expected), path


def test_simhash_of_corpus_texts_is_that_of_the_definition(messages):
    import re

    word = re.compile(r"[^\W_]+|#", re.UNICODE)
    for path, msg in messages[::3]:
        words = word.findall(normalise(msg.text))[:3000]
        assert simhash(words) == simhash_by_definition(words), path


def osb_by_definition(seq: list[str], window: int = tk.OSB_WINDOW) -> list[str]:
    out = []
    for i, first in enumerate(seq):
        for gap in range(1, window + 1):
            if i + gap < len(seq):
                out.append(first + " " + "_ " * (gap - 1) + seq[i + gap])
    return out


def test_word_pairs_are_those_of_the_definition(messages):
    for n in range(0, 9):  # short texts, where the last words have fewer partners
        seq = [f"w{i}" for i in range(n)]
        for window in (1, 2, 3, 4):
            assert tk.osb(seq, window) == osb_by_definition(seq, window), (n, window)
    for path, msg in messages[::4]:
        seq = tk.words(msg.text)
        assert tk.osb(seq) == osb_by_definition(seq), path
