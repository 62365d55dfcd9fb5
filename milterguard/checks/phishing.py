"""Phishing: homograph domains, display-name spoofing and lookalike domains.

- PHISH_HOMOGRAPH_URL / PHISH_HOMOGRAPH_FROM: a domain (IDNA-decoded, so
  punycode counts) whose label mixes Latin with letters of another script
  that look like Latin ones (`pаypal.com` with a Cyrillic а), or that is
  written wholly in letters that each look like a Latin one (`аррӏе.com`).
  Internationalised names in one script (münchen.de, bücher.de, 日本語.jp,
  россия.рф) do not fire.  Confusables come from the Unicode data of the
  `confusable_homoglyphs` package.
- PHISH_DISPLAY_ADDRESS: the From display name carries an address of
  another domain than the real sender's.
- PHISH_DISPLAY_NAME: the display name starts with a protected brand or
  person (phishing.protected_names) or the recipient's organisation name,
  while the sender's domain is not one of theirs.
- PHISH_LOOKALIKE_URL / PHISH_LOOKALIKE_FROM: a domain a small edit distance
  away from (or spelled with rn for m, 0 for o...) a protected domain or the
  recipient's own, without being it.

Link hosts include the targets of redirects carried in query strings
(`?url=https://...`), which are judged as if linked directly.  Link text that
shows another site, raw IP links and URL shorteners are uri.py's and
shorteners.map's (URI_TEXT_MISMATCH, URI_IP_HOST, URI_SHORTENER).
"""

from __future__ import annotations

import re
import unicodedata
import weakref
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import parse_qsl, unquote

from confusable_homoglyphs import categories, confusables

from milterguard.checks.registry import check, preparer
from milterguard.model import Hits, Stage
from milterguard.mail.domains import org_domain
from milterguard.mail.urls import normalize_host

MAX_HOSTS = 50  # distinct hosts of one message judged
_EMBEDDED = re.compile(r"(?i)(?:https?:)?//([^/?#&\s:@]+)")
_ADDRESS_IN_NAME = re.compile(r"[^\s<>()\[\],;:\"'@]+@([a-z0-9-]+(?:\.[a-z0-9-]+)+)", re.I)
# Lookalike spellings, applied to both sides before comparing (RFC-free folklore of phishing kits).
_SKELETON = (("rn", "m"), ("vv", "w"), ("0", "o"), ("1", "l"), ("!", "l"), ("5", "s"))


# ------------------------------------------------------------------ homographs


@lru_cache(maxsize=4096)
def _latin_lookalike(char: str) -> str | None:
    """The ASCII letter or digit CHAR (of a non-Latin script) passes for, or None."""
    if char.isascii():
        return None
    found = confusables.is_confusable(char, preferred_aliases=["latin", "common"])
    if not found:
        return None
    for glyph in found[0]["homoglyphs"]:
        if len(glyph["c"]) == 1 and glyph["c"].isascii() and glyph["c"].isalnum():
            return glyph["c"].lower()
    return None


def _describe(char: str, latin: str) -> str:
    return f"{char} U+{ord(char):04X} {unicodedata.name(char, '?')} looks like {latin}"


@lru_cache(maxsize=4096)
def homograph(domain: str) -> str | None:
    """Why DOMAIN (Unicode) is a homograph, naming its confusable characters; or None."""
    if domain.isascii():
        return None
    labels = domain.split(".")
    tld_ascii = labels[-1].isascii()
    for label in labels:
        if label.isascii():
            continue
        letters = [c for c in label if c.isalpha()]
        scripts = categories.unique_aliases("".join(letters)) - {"COMMON", "INHERITED"}
        lookalikes = [(c, _latin_lookalike(c)) for c in dict.fromkeys(letters)]
        confusing = [(c, latin) for c, latin in lookalikes if latin]
        if not confusing:
            continue
        if "LATIN" in scripts and len(scripts) > 1:
            # Latin mixed with another script's lookalikes: pаypal (Cyrillic а).
            return f"{domain}: mixed scripts, " + "; ".join(_describe(c, latin) for c, latin in confusing[:4])
        if len(scripts) == 1 and "LATIN" not in scripts and tld_ascii and len(confusing) == len(lookalikes):
            # Every letter passes for a Latin one, under a Latin TLD: аррӏе.com.
            spelled = "".join(_latin_lookalike(c) or c for c in label)
            return f"{domain}: all {next(iter(scripts)).lower()} letters spell {spelled}, " + "; ".join(
                _describe(c, latin) for c, latin in confusing[:4])
    return None


# ------------------------------------------------------------------ lookalikes


def edit_distance(a: str, b: str, limit: int) -> int:
    """Damerau-Levenshtein distance (adjacent swaps count 1), or limit + 1 once it exceeds LIMIT.

    Bounded: strings whose lengths differ by more than LIMIT are not compared,
    a shared prefix and suffix are dropped, and only the band of cells within
    LIMIT of the diagonal is filled, stopping when a whole row is past it.
    """
    if a == b:
        return 0
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    if limit == 1:  # the default: one linear pass
        return 1 if _one_edit_apart(a, b) else 2
    start = 0
    while start < len(a) and start < len(b) and a[start] == b[start]:
        start += 1
    # Keep one shared character on each side so that a swap across the cut is still seen.
    start = max(start - 1, 0)
    end_a, end_b = len(a), len(b)
    while end_a > start and end_b > start and a[end_a - 1] == b[end_b - 1]:
        end_a -= 1
        end_b -= 1
    a, b = a[start:min(end_a + 1, len(a))], b[start:min(end_b + 1, len(b))]
    over = limit + 1
    width = len(b)
    prev2: list[int] = []
    prev = [j if j <= limit else over for j in range(width + 1)]
    for i in range(1, len(a) + 1):
        ca = a[i - 1]
        lo, hi = max(1, i - limit), min(width, i + limit)
        cur = [over] * (width + 1)
        cur[0] = i if i <= limit else over
        best = cur[0]
        for j in range(lo, hi + 1):
            cb = b[j - 1]
            value = prev[j - 1] if ca == cb else prev[j - 1] + 1
            if prev[j] + 1 < value:
                value = prev[j] + 1
            if cur[j - 1] + 1 < value:
                value = cur[j - 1] + 1
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb and prev2[j - 2] + 1 < value:
                value = prev2[j - 2] + 1
            cur[j] = value if value <= limit else over
            if cur[j] < best:
                best = cur[j]
        if best > limit:
            return over
        prev2, prev = prev, cur
    return prev[width]


def _one_edit_apart(a: str, b: str) -> bool:
    """Whether A and B (not equal) are one change, insertion, deletion or adjacent swap apart."""
    if len(a) < len(b):
        a, b = b, a
    i = 0
    while i < len(b) and a[i] == b[i]:
        i += 1
    if len(a) != len(b):
        return a[i + 1:] == b[i:]
    return a[i + 1:] == b[i + 1:] or (a[i + 1:i + 2] == b[i:i + 1] and a[i:i + 1] == b[i + 1:i + 2]
                                      and a[i + 2:] == b[i + 2:])


def skeleton(text: str) -> str:
    for seq, rep in _SKELETON:
        text = text.replace(seq, rep)
    return text


@dataclass(frozen=True)
class _Target:
    """A protected domain, with what comparing a domain to it needs."""

    domain: str
    name: str  # its first label: paypal of paypal.com
    skeleton: str
    name_skeleton: str


class Guarded:
    """Protected domains prepared for lookups, indexed by skeleton, by length and by name.

    Built once for the configured domains (when the engine loads) and once per
    recipient domain (cached), so that judging a host costs a few dictionary
    look-ups and a bounded distance to the few protected domains of about its
    length, and never compiles a pattern."""

    def __init__(self, domains: frozenset[str], limit: int) -> None:
        self.domains = domains
        self.limit = limit
        # Short names are a short edit away from too many real ones.
        targets = [_Target(d, d.split(".")[0], skeleton(d), skeleton(d.split(".")[0]))
                   for d in sorted(domains) if len(d.split(".")[0]) >= 5]
        self.targets = tuple(t.domain for t in targets)
        self.by_skeleton: dict[str, str] = {}
        self.by_name_skeleton: dict[str, list[_Target]] = {}
        self.by_length: dict[int, list[str]] = {}
        self.by_name: dict[str, str] = {}
        for t in targets:
            self.by_skeleton.setdefault(t.skeleton, t.domain)
            self.by_name_skeleton.setdefault(t.name_skeleton, []).append(t)
            self.by_length.setdefault(len(t.domain), []).append(t.domain)
            self.by_name.setdefault(t.name, t.domain)

    def protects(self, domain: str, org: str) -> bool:
        """Whether DOMAIN (of organisation ORG) is a protected domain or under one."""
        if org in self.domains:
            return True
        labels = domain.split(".")
        return any(".".join(labels[i:]) in self.domains for i in range(len(labels) - 1))

    def imitated(self, domain: str, org: str) -> str | None:
        """The protected domain that DOMAIN (not itself protected) imitates, or None."""
        target = self.by_skeleton.get(skeleton(org))
        if target is not None:
            return target
        name = org.split(".")[0]
        for t in self.by_name_skeleton.get(skeleton(name), ()):
            if t.name != name:
                return t.domain
        limit = self.limit
        for length in range(len(org) - limit, len(org) + limit + 1) if limit else ():
            for target in self.by_length.get(length, ()):
                if edit_distance(org, target, limit) <= limit:
                    return target
        return self.dressed(domain)

    def dressed(self, domain: str) -> str | None:
        """The protected domain or name DOMAIN is dressed up in: paypal.com.evil.example,
        paypal-secure.example, secure-paypal.example (a name that is one part of a
        hyphenated label, or several parts of it, but not the whole label)."""
        for target in self.targets:
            if target + "." in domain:
                return target
        for label in domain.split("."):
            if "-" not in label:
                continue
            parts = label.split("-")[:8]
            for i in range(len(parts)):
                for j in range(i + 1, len(parts) + 1):
                    if (i or j < len(parts)) and "-".join(parts[i:j]) in self.by_name:
                        return self.by_name["-".join(parts[i:j])]
        return None


@lru_cache(maxsize=256)
def _guarded(domains: frozenset[str], limit: int) -> Guarded:
    return Guarded(domains, limit)


def lookalike(domain: str, guards: tuple[Guarded, ...]) -> str | None:
    """The protected domain DOMAIN's organisation imitates (of any of GUARDS), or None,
    also when DOMAIN is one of them or under one."""
    org = org_domain(domain)
    if not org.isascii() or any(g.protects(domain, org) for g in guards):
        return None
    for guard in guards:
        target = guard.imitated(domain, org)
        if target is not None:
            return target
    return None


# ------------------------------------------------------------------ the check


@dataclass(frozen=True)
class _Settings:
    names: dict[str, frozenset[str]]
    protected: frozenset[str]
    limit: int


_PREPARED: dict[int, _Settings] = {}


@preparer("phishing")
def _settings(config) -> _Settings:
    """The check's settings in the shape it uses, built once per configuration."""
    prepared = _PREPARED.get(id(config))
    if prepared is not None:
        return prepared
    names = {name.lower(): frozenset(d.lower() for d in domains) for name, domains in config["phishing.protected_names"].items()}
    domains = frozenset(d.lower() for d in config["phishing.protected_domains"])
    domains |= frozenset(d for ds in names.values() for d in ds)
    prepared = _PREPARED[id(config)] = _Settings(names, domains, config["phishing.lookalike_distance"])
    weakref.finalize(config, _PREPARED.pop, id(config), None)
    _guarded(domains, prepared.limit)
    return prepared


def _link_hosts(urls) -> dict[str, str]:
    """host -> how it was found (a link, or a redirect in a link's query)."""
    out: dict[str, str] = {}
    for url in urls:
        if url.scheme not in ("http", "https", "") or not url.host:
            continue
        out.setdefault(url.host, "link")
        query = url.url.partition("?")[2]
        if not query or "//" not in unquote(query):
            continue
        for _key, value in parse_qsl(query, keep_blank_values=False):
            m = _EMBEDDED.match(value.strip())
            if m:
                host = normalize_host(m.group(1))
                if host and host != url.host:
                    out.setdefault(host, f"redirect from {url.host}")
        if len(out) >= MAX_HOSTS:
            break
    return out


_NON_WORD = re.compile(r"[^\w]+")


def _name_words(text: str) -> str:
    return " " + _NON_WORD.sub(" ", text.lower()) + " "


@check(stage=Stage.EOM, emits=("PHISH_HOMOGRAPH_URL", "PHISH_HOMOGRAPH_FROM", "PHISH_DISPLAY_ADDRESS",
                               "PHISH_DISPLAY_NAME", "PHISH_LOOKALIKE_URL", "PHISH_LOOKALIKE_FROM"), priority=35)
def phishing(scan, hits: Hits) -> None:
    """Homograph and lookalike domains, and display names that pretend to be someone else."""
    msg = scan.message
    settings = _settings(scan.config)
    names = settings.names
    rcpt_domains = frozenset(org_domain(d) for d in (scan.txn.rcpt_domains if scan.txn else []) if "." in d)
    guards = (_guarded(settings.protected, settings.limit),
              *(_guarded(frozenset({d}), settings.limit) for d in sorted(rcpt_domains - settings.protected)))
    judged: dict[str, str | None] = {}  # each distinct domain once per message

    def imitated(domain: str) -> str | None:
        if domain not in judged:
            judged[domain] = lookalike(domain, guards)
        return judged[domain]
    from_domain = normalize_host(msg.from_domain) if msg.from_domain else ""  # xn-- labels decoded
    from_org = org_domain(from_domain) if from_domain else ""

    if from_domain:
        why = homograph(from_domain)
        if why:
            hits.add("PHISH_HOMOGRAPH_FROM", from_domain, where="header From", text=why)
        target = imitated(from_domain)
        if target:
            hits.add("PHISH_LOOKALIKE_FROM", f"{from_domain}~{target}", where="header From",
                     text=f"{from_domain} imitates {target}")

    display = msg.from_name
    if display and from_domain:
        m = _ADDRESS_IN_NAME.search(display)
        if m and org_domain(m.group(1).lower()) != from_org:
            hits.add("PHISH_DISPLAY_ADDRESS", m.group(0).lower(), where="header From",
                     text=f'"{display[:60]}" <{msg.from_addr}>')
        # A name the display name starts with: "PayPal Security", not "Lockergnome Apple Core" (a
        # newsletter about the brand). An address in the name is judged above.
        words = _name_words(_ADDRESS_IN_NAME.sub(" ", display)).lstrip()
        claimed = [(name, domains) for name, domains in names.items() if words.startswith(f"{name} ")]
        # The recipient's own organisation: its name (example in example.org).
        claimed += [(org.split(".")[0], frozenset({org})) for org in rcpt_domains
                    if len(org.split(".")[0]) >= 4 and words.startswith(f"{org.split('.')[0]} ")]
        for name, domains in claimed:
            if not any(from_domain == d or from_domain.endswith("." + d) for d in domains):
                hits.add("PHISH_DISPLAY_NAME", f"{name}<>{from_domain}", where="header From",
                         text=f'"{display[:60]}" is not sent from {", ".join(sorted(domains)[:3])}')
                break

    for host, found in list(_link_hosts(msg.urls).items())[:MAX_HOSTS]:
        why = homograph(host)
        if why:
            hits.add("PHISH_HOMOGRAPH_URL", host, where="URL" if found == "link" else found, text=why)
        target = imitated(host)
        if target:
            hits.add("PHISH_LOOKALIKE_URL", f"{host}~{target}", where="URL" if found == "link" else found,
                     text=f"{host} imitates {target}")
