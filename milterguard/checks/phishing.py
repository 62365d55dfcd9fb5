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
from functools import lru_cache
from urllib.parse import parse_qsl, unquote

from confusable_homoglyphs import categories, confusables

from milterguard.checks.uri import _base as org_domain
from milterguard.engine.checks import check
from milterguard.engine.model import Hits, Stage
from milterguard.urls import normalize_host

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
    """Damerau-Levenshtein distance (adjacent swaps count 1), or limit + 1 once it exceeds LIMIT."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cost = 0 if ca == cb else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]


def skeleton(text: str) -> str:
    for seq, rep in _SKELETON:
        text = text.replace(seq, rep)
    return text


def lookalike(domain: str, protected: frozenset[str], limit: int) -> str | None:
    """The protected domain DOMAIN's organisation imitates, or None (also when it is one of them)."""
    org = org_domain(domain)
    if org in protected or not org.isascii():
        return None
    name = org.split(".")[0]
    for target in protected:
        if domain == target or domain.endswith("." + target):
            return None
    for target in protected:
        tname = target.split(".")[0]
        if len(tname) < 5:  # short names are a short edit away from too many real ones
            continue
        if skeleton(org) == skeleton(target) or (name != tname and skeleton(name) == skeleton(tname)):
            return target
        if edit_distance(org, target, limit) <= limit:
            return target
        # The protected domain or name dressed up: paypal.com.evil.example, paypal-secure.example.
        if f"{target}." in domain or re.search(rf"(?:^|[.-]){re.escape(tname)}-|-{re.escape(tname)}(?:[.-]|$)", domain):
            return target
    return None


# ------------------------------------------------------------------ the check


def _settings(config) -> tuple[dict[str, frozenset[str]], frozenset[str], int]:
    names = {name.lower(): frozenset(d.lower() for d in domains) for name, domains in config["phishing.protected_names"].items()}
    domains = frozenset(d.lower() for d in config["phishing.protected_domains"])
    domains |= frozenset(d for ds in names.values() for d in ds)
    return names, domains, config["phishing.lookalike_distance"]


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


def _name_words(text: str) -> str:
    return " " + re.sub(r"[^\w]+", " ", text.lower()) + " "


@check(stage=Stage.EOM, emits=("PHISH_HOMOGRAPH_URL", "PHISH_HOMOGRAPH_FROM", "PHISH_DISPLAY_ADDRESS",
                               "PHISH_DISPLAY_NAME", "PHISH_LOOKALIKE_URL", "PHISH_LOOKALIKE_FROM"), priority=35)
def phishing(scan, hits: Hits) -> None:
    """Homograph and lookalike domains, and display names that pretend to be someone else."""
    msg = scan.message
    names, protected, limit = _settings(scan.config)
    rcpt_domains = frozenset(org_domain(d) for d in (scan.txn.rcpt_domains if scan.txn else []) if "." in d)
    guarded = protected | rcpt_domains
    from_domain = normalize_host(msg.from_domain) if msg.from_domain else ""  # xn-- labels decoded
    from_org = org_domain(from_domain) if from_domain else ""

    if from_domain:
        why = homograph(from_domain)
        if why:
            hits.add("PHISH_HOMOGRAPH_FROM", from_domain, where="header From", text=why)
        target = lookalike(from_domain, guarded, limit)
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
        target = lookalike(host, guarded, limit)
        if target:
            hits.add("PHISH_LOOKALIKE_URL", f"{host}~{target}", where="URL" if found == "link" else found,
                     text=f"{host} imitates {target}")
