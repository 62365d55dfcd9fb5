"""Brand impersonation: a message that names a brand it does not come from.

The brands and their domains are a list file, `brands.map` (setting
`phishing.brands_map`, looked up in `rules.maps_dirs`): one brand a line,
`name: domain domain ...`.  A brand "owns" a message when the From domain or a DKIM
signer's domain is one of its domains or under one, or when half of the
message's link hosts or more are.  A
brand named (as whole words, any case) where it does not own the message:

- PHISH_BRAND_NAME: at the start or the end of the From display name ("Microsoft 365
  Admin" <it@evil.example>, "HR via DocuSign"; not "Lockergnome Apple Core", nor an
  employer in brackets after a person's name);
- PHISH_BRAND_SUBJECT: in the Subject ("Your DocuSign document is ready");
- PHISH_BRAND_TEXT: in the first TEXT_CHARS of the text, of a message with links.

The DKIM signers are the domains of signatures that verified when DKIM ran;
without DNS (an offline scan) they are the `d=` of the DKIM-Signature
headers, which only a signature check could refute.  The checks weigh little
alone: a newsletter or a mailing list speaks of brands too.  The composites of
rules/lures.yaml count them with a lure.
"""

from __future__ import annotations

import re
import weakref

import re2
from dataclasses import dataclass
from pathlib import Path

from milterguard.checks.registry import check, preparer
from milterguard.model import Hits, Stage

TEXT_CHARS = 4000
_EDGE = " \t\"'.,:;-|/()[]<>!*#"
_EMPLOYER = re.compile(r"(?<=\w)\s*\([^()]{2,40}\)$")
_DKIM_D = re.compile(r"(?:^|;)\s*d\s*=\s*([A-Za-z0-9.-]+)")


@dataclass(frozen=True)
class Brands:
    """The brands of a map file: a pattern that finds their names, and each name's domains."""

    pattern: "re2._Regexp | None"
    domains: dict[str, frozenset[str]]


class BrandsMapError(ValueError):
    """A line of the brands map is not `name: domain ...`."""


def parse_brands(text: str, where: str = "<brands>") -> Brands:
    """Parse a brands map: `name: domain domain ...` a line, `#` comments."""
    domains: dict[str, frozenset[str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, rest = line.partition(":")
        name = " ".join(name.lower().split())
        listed = frozenset(d.lower().strip(".") for d in rest.split() if "." in d)
        if not sep or not name or not listed:
            raise BrandsMapError(f"{where}:{number}: expected `name: domain ...`, got {line!r}")
        domains[name] = domains.get(name, frozenset()) | listed
    if not domains:
        return Brands(None, {})
    names = sorted(domains, key=len, reverse=True)
    words = "|".join(r"\s+".join(re.escape(word) for word in name.split()) for name in names)
    # RE2: one pass in linear time over the text, whatever the number of brands (Python's re
    # tries each alternative at each position: 0.6 ms a message for 60 brands).
    return Brands(re2.compile(rf"(?i)(?:^|[^\w.-])((?:{words}))(?:$|[^\w-])"), domains)


_PREPARED: dict[int, Brands] = {}


def find_map(config) -> Path | None:
    name = config["phishing.brands_map"]
    if not name:
        return None
    path = Path(config.expand(name))
    if path.is_absolute():
        return path
    for base in config["rules.maps_dirs"]:
        candidate = Path(config.expand(base)) / name
        if candidate.is_file():
            return candidate
    raise BrandsMapError(f"phishing.brands_map: {name!r} not found in rules.maps_dirs")


@preparer("brand_impersonation")
def brands_for(config) -> Brands:
    """The brands of CONFIG's map file, read once per configuration."""
    prepared = _PREPARED.get(id(config))
    if prepared is not None:
        return prepared
    path = find_map(config)
    brands = parse_brands(path.read_text(encoding="utf-8"), str(path)) if path is not None else Brands(None, {})
    _PREPARED[id(config)] = brands
    weakref.finalize(config, _PREPARED.pop, id(config), None)
    return brands


def _under(host: str, domain_set: frozenset[str]) -> bool:
    labels = host.split(".")
    return any(".".join(labels[i:]) in domain_set for i in range(len(labels) - 1))


def _owned(domain_set: frozenset[str], senders: set[str], hosts: set[str]) -> bool:
    """The brand sent the message (From or a DKIM signer is its), or half its link hosts or more are
    the brand's (a receipt forwarded by a person). Phishing adds a link or two to the real site for
    looks, next to its own."""
    if any(_under(d, domain_set) or d in domain_set for d in senders):
        return True
    return bool(hosts) and 2 * sum(1 for h in hosts if h in domain_set or _under(h, domain_set)) >= len(hosts)


def _signers(scan) -> set[str]:
    dkim = scan.txn.facts.dkim if scan.txn is not None else None
    if dkim is not None and dkim.result != "none":
        return set(dkim.passing_domains)
    out = set()
    for value in scan.message.header_raw("DKIM-Signature")[:5]:
        m = _DKIM_D.search(value)
        if m:
            out.add(m.group(1).lower().rstrip("."))
    return out


@check(stage=Stage.EOM, emits=("PHISH_BRAND_NAME", "PHISH_BRAND_SUBJECT", "PHISH_BRAND_TEXT"), priority=36,
       after=("dkim",))
def brand_impersonation(scan, hits: Hits) -> None:
    """A brand named in the display name, Subject or text of a message none of its domains sent or links to."""
    brands = brands_for(scan.config)
    if brands.pattern is None:
        return
    msg = scan.message
    # "Vineeth Pillai (Google)": a person and the employer in brackets, not a brand speaking.
    name = _EMPLOYER.sub("", msg.from_name) if msg.from_name.endswith(")") else msg.from_name
    places = [("PHISH_BRAND_NAME", "header From", name), ("PHISH_BRAND_SUBJECT", "header Subject", msg.subject)]
    found = [(symbol, where, text, m) for symbol, where, text in places if text and (m := brands.pattern.search(text))]
    # The display name speaks as the brand when it starts or ends with it ("PayPal Service", "HR via
    # DocuSign"); one in the middle is a topic ("Lockergnome Apple Core", a newsletter about it).
    found = [(symbol, where, m.group(1)) for symbol, where, text, m in found if symbol != "PHISH_BRAND_NAME"
             or not text[:m.start(1)].strip(_EDGE) or not text[m.end(1):].strip(_EDGE)]
    text_match = brands.pattern.search(msg.text[:TEXT_CHARS]) if msg.urls else None
    text_brand = text_match.group(1) if text_match is not None else None
    if not found and text_brand is None:
        return
    # Who the message is from, and where it links: the From domain, the DKIM signers, every link host.
    senders = {d.lower() for d in (msg.from_domain, *_signers(scan)) if d}
    hosts = {u.host for u in msg.urls if u.host and u.scheme != "mailto" and u.source != "redirect"}
    judged: dict[str, bool] = {}

    def foreign(name: str) -> bool:
        key = " ".join(name.lower().split())
        if key not in judged:
            domain_set = brands.domains.get(key, frozenset())
            judged[key] = bool(domain_set) and not _owned(domain_set, senders, hosts)
        return judged[key]

    for symbol, where, brand in found:
        if foreign(brand):
            hits.add(symbol, " ".join(brand.lower().split()), where=where,
                     text=f"{brand!r} from {msg.from_domain or 'no domain'}, not one of its domains")
    if text_brand is not None and foreign(text_brand):
        hits.add("PHISH_BRAND_TEXT", " ".join(text_brand.lower().split()), where="body",
                 text=f"{text_brand!r} named; no link to its domains, sent from {msg.from_domain or 'no domain'}")
