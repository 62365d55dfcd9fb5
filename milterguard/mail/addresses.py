"""Addresses in header fields: plain single addresses read by a fast path,
everything else by the email package's parser, bounded on huge headers.
"""

from __future__ import annotations

import email.utils
import re

from milterguard.mail.charsets import decode_header_value

MAX_ADDRESS_CHARS = 16 * 1024
MAX_ADDRESS_HEADERS = 100  # of one name: 3,000 From or To headers took 0.5 s to parse
BARE_ADDRESS = re.compile(r"[^\s<>()\[\],;:\"@]+@[^\s<>()\[\],;:\"@]+")
# The shapes most address headers have: one address, bare or in angle brackets after a
# quoted or plain display name.  `simple_addresses` reads them without the email
# package's general parser (pure Python, tens of microseconds a header); anything else,
# comments, groups, lists and escapes included, still goes to email.utils.getaddresses.
_ATOM_ADDR = r"([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)"
_SIMPLE_ADDRESS = re.compile(
    r'[ \t]*(?:"([^"\\\r\n]*)"[ \t]*|([A-Za-z0-9 \t]*?)[ \t]*)<' + _ATOM_ADDR + r'>[ \t]*'
    r"|[ \t]*" + _ATOM_ADDR + r"[ \t]*")


def simple_addresses(value: str) -> list[tuple[str, str]] | None:
    """getaddresses([VALUE]) for a single plain address, or None for anything else."""
    m = _SIMPLE_ADDRESS.fullmatch(value)
    if m is None:
        return None
    quoted, plain, bracketed, bare = m.groups()
    if bare is not None:
        address = bare
        display = ""
    else:
        address = bracketed
        display = quoted if quoted is not None else " ".join(plain.split())
    if ".." in address or address.startswith(".") or "." + "@" in address or "@." in address:
        return None  # the general parser has its own ideas about dots
    return [(display, address)]



def parse_addresses(values: list[str]) -> list[tuple[str, str]]:
    """(decoded display name, address) pairs from the raw values of one address header.

    The domain part of each address is lowercased.  Garbage yields
    whatever email.utils could make of it, never an exception.
    """
    # email.utils parses in pure Python: bound the work on huge headers.
    values = [value[:MAX_ADDRESS_CHARS] for value in values[:MAX_ADDRESS_HEADERS]]
    result: list[tuple[str, str]] = []
    if not values:
        return result
    try:
        found = simple_addresses(values[0]) if len(values) == 1 else None
        if found is None:
            found = email.utils.getaddresses(values)
    except (IndexError, ValueError, TypeError, AttributeError, RecursionError):
        # Known crashers of the stdlib address parser on garbage;
        # RecursionError comes from deeply nested "(((" comments.
        found = [("", address) for value in values for address in BARE_ADDRESS.findall(value)]
    for display, address in found:
        if not address and not display:
            continue
        if "=?" in display:
            display = decode_header_value(display)[0]
        local, at, domain = address.rpartition("@")
        if at:
            address = f"{local}@{domain.lower()}"
        result.append((display, address))
    return result
