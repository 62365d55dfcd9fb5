"""Registered (organisational) domains, by the public suffix list.

One function serves DMARC alignment (RFC 7489 3.2), the blocklist look-ups
of sender and link domains, link-text comparisons, the phishing checks and
the learned tokens, so that they all agree on what "the same organisation"
means.  The list ships with the publicsuffixlist package: nothing is fetched.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _psl():
    import publicsuffixlist

    return publicsuffixlist.PublicSuffixList()


def _is_ip(host: str) -> bool:
    if ":" in host:
        return True  # an IPv6 literal: no host name has a colon
    labels = host.split(".")
    return len(labels) == 4 and all(label.isdigit() for label in labels)


@lru_cache(maxsize=8192)
def org_domain(host: str) -> str:
    """The registered domain of HOST (`mail.bank.co.uk` -> `bank.co.uk`).

    A name that is itself a public suffix, or that the list does not know,
    is its own organisational domain; an IP address is its own too.
    """
    host = host.strip().strip("[]").rstrip(".").lower()
    if not host or _is_ip(host):
        return host
    return _psl().privatesuffix(host) or host
