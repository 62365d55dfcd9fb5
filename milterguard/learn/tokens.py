"""The tokens of a message, shared by Bayes and the learned classifier.

A message yields, in this order and each token once:

- words of the Subject, prefixed `s:`;
- character 3- and 4-grams of the Subject (`c:s:`) and of the From display
  name (`c:f:`), lowercased, spaces collapsed, each padded with one space:
  they catch what words miss (scripts without spaces between words,
  obfuscated and glued-together words, a sender name's style);
- words of the decoded text (text parts, HTML reduced to text), lowercased,
  NFKC-normalised, accents kept; long words are cut to a `sk:` stem, long
  numbers become their shape (`n:5d`);
- sparse bigrams in the OSB style: each word paired with the next
  `OSB_WINDOW` words, the distance part of the token (`a b`, `a _ b`,
  `a _ _ b`...), so that phrases count beyond single words;
- selected header tokens (`h:NAME:VALUE`): sender and reply domains,
  mailer, charsets, content types, the shape of Message-ID and Received;
- URL hosts and their registered domain (`u:`), attachment types (`a:`);
- the shape of the message (`st:`): size, words, links, hosts, HTML or
  text parts, attachments, capitals and `!` in the Subject, `!` and `$` in
  the text, images, each as a count bucket.

Only the first `MAX_WORDS` words of the text are read and at most
`MAX_TOKENS` tokens are returned, so the work per message is bounded; the
same message always yields the same tokens in the same order.

`Pieces` holds what a message's tokens are made of (its words, character
n-grams, header, shape and URL tokens), each made once: Bayes and the
site's classifier (`tokenize`) and the shipped model (`linear.shipped_tokens`,
no word pairs, fewer words) build their tokens from the same pieces.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import TYPE_CHECKING

from milterguard.mail.domains import org_domain

if TYPE_CHECKING:  # pragma: no cover
    from milterguard.mail.message import Message

MAX_WORDS = 1500
MAX_TOKENS = 4000
OSB_WINDOW = 3  # bigrams of each word with the next 3 words
CHAR_GRAMS = (3, 4)  # character n-gram lengths of the Subject and From display name
CHAR_GRAM_TEXT = 200  # characters of the Subject or display name read for them
MIN_LEN, MAX_LEN = 2, 20

_WORD = re.compile(r"[^\W_](?:[\w$€£%'@.+-]*[^\W_$])?")
_DIGITS = re.compile(r"\d")
_SPACES = re.compile(r"\s+")
_MAILER_WORD = re.compile(r"[a-z][a-z.-]+")
_ID_SHAPE = re.compile(r"[a-z]+|[0-9]+|[^a-z0-9]")


def normalise(word: str) -> str | None:
    """A word as it is counted, or None for a word not worth counting."""
    if not word.isascii():  # ASCII is NFKC-normal already
        word = unicodedata.normalize("NFKC", word)
    word = word.lower().strip(".'-+")
    if len(word) < MIN_LEN:
        return None
    if not word.isalpha():
        digits = len(_DIGITS.findall(word))
        if digits > 4 and digits * 2 >= len(word):
            return f"n:{digits}d"  # long numbers: only their length says something
    if len(word) > MAX_LEN:
        return "sk:" + word[:8]
    return word


def words(text: str, limit: int = MAX_WORDS) -> list[str]:
    """The normalised words of a text, at most `limit`."""
    out: list[str] = []
    append = out.append
    for word in _WORD.findall(text):
        # The common case inline: a short plain word of lower-case ASCII letters.
        if MIN_LEN <= len(word) <= MAX_LEN and word.isascii() and word.isalpha() and word.islower():
            append(word)
        else:
            word = normalise(word)
            if word is None:
                continue
            append(word)
        if len(out) >= limit:
            break
    return out


def char_grams(text: str, prefix: str) -> list[str]:
    """Character n-grams (lengths CHAR_GRAMS) of a short text, lowercased and NFKC-normalised."""
    text = _SPACES.sub(" ", unicodedata.normalize("NFKC", text[:CHAR_GRAM_TEXT]).lower()).strip()
    if not text:
        return []
    text = f" {text} "
    return [prefix + text[i:i + n] for n in CHAR_GRAMS for i in range(len(text) - n + 1)]


def osb(seq: list[str], window: int = OSB_WINDOW) -> list[str]:
    """Orthogonal sparse bigrams: each word with each of the next `window` words.

    In the order word by word, then gap by gap: (w0 w1, w0 _ w2, w0 _ _ w3, w1 w2, ...)."""
    n = len(seq)
    # The pairs of each gap made in one pass (str.join on pairs), then laid out word by word
    # by slice assignment: no Python step per token.
    columns = [list(map(sep.join, zip(seq, seq[gap:])))
               for gap, sep in ((g, " " + "_ " * (g - 1)) for g in range(1, window + 1))]
    full = max(n - window, 0)  # the words with all `window` partners
    out: list[str] = [""] * (window * full)
    for gap in range(window):
        out[gap::window] = columns[gap][:full]
    for i in range(full, n - 1):  # the last ones, with fewer
        out.extend(columns[gap][i] for gap in range(min(window, n - 1 - i)))
    return out


def _domain_of(addr: str) -> str:
    return addr.rpartition("@")[2].lower().strip(">. ") if "@" in addr else ""


def header_tokens(msg: "Message") -> list[str]:
    """Tokens of the headers that tell senders and mailers apart."""
    out: list[str] = []
    from_domain = msg.from_domain
    if from_domain:
        out += [f"h:from:{from_domain}", f"h:fromreg:{org_domain(from_domain)}"]
    if msg.from_name:
        out.append("h:fromname")
        out += [f"h:fn:{w}" for w in words(msg.from_name, 6)]
    for name in ("Reply-To", "Return-Path", "Sender"):
        for _display, addr in msg.addresses(name)[:1]:
            domain = _domain_of(addr)
            out.append(f"h:{name.lower()}:{domain or 'none'}")
            if domain and domain != from_domain:
                out.append(f"h:{name.lower()}:differs")
    mailer = msg.header("X-Mailer") or msg.header("User-Agent") or ""
    out += [f"h:mailer:{w}" for w in _MAILER_WORD.findall(mailer.lower())[:4]] or ["h:mailer:none"]
    mid = msg.message_id
    if mid:
        local, _, domain = mid.partition("@")
        shape = "".join(t[0] if t[0].isalpha() else ("9" if t[0].isdigit() else t) for t in _ID_SHAPE.findall(local.lower()))
        out += [f"h:midshape:{shape[:12]}", f"h:middomain:{org_domain(domain)}" if domain else "h:middomain:none"]
    else:
        out.append("h:mid:none")
    # Only the number of hops: the newest Received lines are the receiving
    # site's own and say nothing about the sender.
    out.append(f"h:received:{min(len(msg.header_values('Received')), 8)}")
    rcpts = len(msg.addresses("To")) + len(msg.addresses("Cc"))
    out.append(f"h:rcpts:{min(rcpts, 10)}")
    for part in msg.parts[:10]:
        out.append(f"h:ctype:{part.content_type}")
        if part.charset:
            out.append(f"h:charset:{part.charset.lower()}")
        if part.transfer_encoding:
            out.append(f"h:cte:{part.transfer_encoding.lower()}")
        if part.is_attachment and part.filename:
            out.append("a:" + part.filename.rpartition(".")[2].lower()[:10])
    for name in ("Precedence", "List-Id", "X-Priority", "Importance", "MIME-Version", "Organization"):
        value = msg.header(name)
        if value is not None:
            out.append(f"h:{name.lower()}:{' '.join(words(value, 3))}")
    return out


def url_tokens(msg: "Message") -> list[str]:
    out: list[str] = []
    for url in msg.urls[:50]:
        if url.host:
            out += [f"u:{url.host}", f"u:reg:{org_domain(url.host)}"]
            if url.scheme:
                out.append(f"u:scheme:{url.scheme}")
    return out


def _bucket(n: int) -> int:
    """0, 1, 2, 3-4, 5-8, 9-16...: counts by order of magnitude."""
    return n if n < 3 else 1 + (n - 1).bit_length()


def structure_tokens(msg: "Message") -> list[str]:
    """The shape of the message: sizes, links, HTML, capitals and exclamations, as tokens."""
    parts = [p for p in msg.parts if p.text is not None and not p.is_attachment]
    html = any(p.is_html for p in parts)
    plain = any(not p.is_html for p in parts)
    text = msg.text
    subject = msg.subject
    letters = [c for c in subject if c.isalpha()]
    caps = sum(1 for c in letters if c.isupper()) / len(letters) if letters else 0.0
    hosts = {u.host for u in msg.urls if u.host}
    return [
        f"st:size:{_bucket(msg.size // 1024)}",
        f"st:words:{_bucket(len(text.split()) // 10)}",
        f"st:urls:{_bucket(len(msg.urls))}",
        f"st:hosts:{_bucket(len(hosts))}",
        f"st:parts:{'html+text' if html and plain else 'html' if html else 'text' if plain else 'none'}",
        f"st:attachments:{_bucket(len(msg.attachments))}",
        f"st:subjcaps:{int(caps * 4)}",
        f"st:subjbang:{min(subject.count('!'), 3)}",
        f"st:bang:{_bucket(text.count('!'))}",
        f"st:dollar:{_bucket(text.count('$'))}",
        f"st:images:{_bucket(msg.html.lower().count('<img'))}" if html else "st:images:none",
    ]


class Pieces:
    """What the tokens of one message are made of, each piece made once, when first asked for."""

    def __init__(self, msg: "Message") -> None:
        self.msg = msg
        self._body: list[str] = []
        self._body_limit = -1  # the limit self._body was read with

    @functools.cached_property
    def subject(self) -> list[str]:
        """The Subject's words, prefixed `s:`."""
        return ["s:" + w for w in words(self.msg.subject, 40)]

    @functools.cached_property
    def subject_pairs(self) -> list[str]:
        return ["s:" + b for b in osb([w[2:] for w in self.subject])]

    @functools.cached_property
    def head(self) -> list[str]:
        """Character n-grams of the Subject and the From display name, then the header, shape and URL tokens."""
        msg = self.msg
        return (char_grams(msg.subject, "c:s:") + char_grams(msg.from_name, "c:f:") + header_tokens(msg)
                + structure_tokens(msg) + url_tokens(msg))

    def body(self, limit: int = MAX_WORDS) -> list[str]:
        """The first LIMIT words of the text: words(text, limit), read once for the largest limit asked."""
        if self._body_limit < limit:
            self._body, self._body_limit = words(self.msg.text, limit), limit
        return self._body if len(self._body) <= limit else self._body[:limit]


def tokenize(msg: "Message", pieces: Pieces | None = None) -> list[str]:
    """The tokens of a message: unique, in a fixed order, at most MAX_TOKENS.

    PIECES, made for the same message, are reused when given."""
    p = pieces if pieces is not None else Pieces(msg)
    body = p.body(MAX_WORDS)
    seq = p.subject + p.subject_pairs + p.head + body
    seq += osb(body)
    return list(dict.fromkeys(seq))[:MAX_TOKENS]
