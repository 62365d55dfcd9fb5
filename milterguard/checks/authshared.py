"""What the sender authentication checks share: the message as received,
the hop to judge, registered domains, Authentication-Results syntax, and
the one adapter to dkimpy through which DKIM and ARC verify signatures.
"""

from __future__ import annotations

import binascii
import ipaddress
import re
import socket
from functools import lru_cache

import dkim as dkimpy
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import padding as rsa_padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers
from dkim import crypto as dkimcrypto
from dkim.canonicalization import Relaxed

from milterguard.clients import dns_client as mgdns
from milterguard.mail.raw import raw_message
from milterguard.mail.domains import org_domain


def active_dns(scan) -> bool:
    """Whether signatures (DKIM, ARC) are checked: DNS on, and not a logged-in client."""
    if not mgdns.enabled(scan.config):
        return False
    return not (scan.config["auth.skip_authenticated"] and scan.conn.authenticated)


def active(scan) -> bool:
    """Whether the client's own authorisation (SPF, DMARC, blocklists) is judged:
    DNS on, and a remote client that did not log in."""
    if not active_dns(scan):
        return False
    if not scan.config["auth.skip_authenticated"]:
        return True
    ip = scan.conn.ip
    return ip is not None and not ip.is_loopback


def header_values(txn, name: str) -> list[str]:
    """The raw values of header NAME, in order (an index built once per message)."""
    headers = txn.headers
    index = txn.facts.scratch.get("raw_header_index")
    if index is None or index[0] != len(headers):
        by_name: dict[str, list[str]] = {}
        for n, v in headers:
            by_name.setdefault(n.lower(), []).append(v)
        index = txn.facts.scratch["raw_header_index"] = (len(headers), by_name)
    return list(index[1].get(name.lower(), ()))


# ---------------------------------------------------------------- relays and hops


@lru_cache(maxsize=64)
def _networks(entries: tuple[str, ...]) -> tuple:
    nets = []
    for entry in entries:
        try:
            nets.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            continue
    return tuple(nets)


def in_networks(ip: str | None, entries: list[str]) -> bool:
    if not ip or not entries:
        return False
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in _networks(tuple(entries)))


_RECEIVED_IP = re.compile(r"\[(?:IPv6:)?([0-9A-Fa-f:.]+)\]")


def received_ips(txn) -> list[str]:
    """Client addresses of the Received headers, newest first (the bracketed ones)."""
    out = []
    for value in header_values(txn, "Received"):
        # Only the "from" clause: the part before " by ".
        part = re.split(r"\sby\s", value, maxsplit=1)[0]
        for m in _RECEIVED_IP.finditer(part):
            try:
                out.append(str(ipaddress.ip_address(m.group(1))))
                break
            except ValueError:
                continue
    return out


def spf_hop(scan) -> tuple[str | None, bool]:
    """(the IP SPF is judged on, whether it came from Received behind a trusted relay)."""
    ip = scan.conn.client_ip
    relays = scan.config["auth.trusted_relays"]
    if not in_networks(ip, relays):
        return ip, False
    if scan.txn is None or not scan.txn.headers:
        return None, True  # only the headers tell: wait for them
    for hop in received_ips(scan.txn):
        if not in_networks(hop, relays):
            return hop, True
    return None, True


# ---------------------------------------------------------------- domains


def aligned(a: str, b: str, mode: str) -> bool:
    """RFC 7489 3.1: strict means equal, relaxed means the same organisational domain."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if not a or not b:
        return False
    if mode == "s":
        return a == b
    return org_domain(a) == org_domain(b)


def under(domain: str, roots: list[str]) -> bool:
    domain = domain.lower().rstrip(".")
    for root in roots:
        root = root.lower().strip().rstrip(".")
        if root and (domain == root or domain.endswith("." + root)):
            return True
    return False


# ---------------------------------------------------------------- Authentication-Results


def authserv_id(scan) -> str:
    configured = scan.config["auth.authserv_id"]
    if configured:
        return configured
    return scan.conn.macros.get("j") or _hostname()


@lru_cache(maxsize=1)
def _hostname() -> str:
    # Not getfqdn(): that asks DNS, and the MTA's j macro is the name that counts anyway.
    return socket.gethostname()


_TOKEN_OK = re.compile(r"^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.@]+$")


def value(text: str) -> str:
    """A method property value: a token as it is, anything else quoted (RFC 8601 2.2)."""
    if _TOKEN_OK.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def comment(text: str) -> str:
    return "(" + re.sub(r"[()\\\r\n]", " ", text)[:120] + ")"


def claimed_authserv_id(header_value: str) -> str:
    """The authserv-id an Authentication-Results value begins with (comments skipped)."""
    text = header_value.strip()
    while text.startswith("("):
        depth, i = 0, 0
        for i, ch in enumerate(text):
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    break
        text = text[i + 1:].strip()
    m = re.match(r"[^\s;()]+", text)
    return m.group(0).strip('"').lower() if m else ""


# ---------------------------------------------------------------- dkimpy adapter
#
# dkimpy verifies in pure Python: for every signature it parses the key record's
# ASN.1 byte by byte, and turns the RSA integers into bytes and back one byte at
# a time.  DKIM and ARC verify through the two classes below instead of dkimpy's
# own, with the same answers:
#
# - a key record already seen by this process is not parsed again: parsed keys
#   are kept by the record's bytes (a key rotated under the same selector is a
#   new record, so it is parsed anew; what DNS answers, and for how long, stays
#   the resolver's concern);
# - the RSA check of a signature is done by OpenSSL (the `cryptography` package)
#   when the signature has the modulus' length and is below it and the key is of
#   a usual size, else as dkimpy does it with integers.  The result is the same: OpenSSL recovers the padded
#   digest and we compare it with dkimpy's own encoding of the expected one;
# - the message is parsed into dkimpy's form once per message (dkimpy_message),
#   not once per DKIM signature and again for ARC;
# - the "relaxed" form of a message's header fields, which dkimpy computes
#   afresh for each signature (and once more to sort the ARC sets), is kept for
#   the last few header sections seen (relaxed_headers); so is the relaxed form
#   of the last two bodies up to 1 MB (relaxed_body), which a DKIM signature and
#   an ARC-Message-Signature, or two DKIM signatures, share when both use it.
#
# Three names of dkimpy are replaced, here and only here, because dkimpy calls
# them from inside DomainSigner.verify_sig_process with no hook: the module-level
# RSASSA_PKCS1_v1_5_verify by rsa_verify, Relaxed.canonicalize_headers by
# relaxed_headers and Relaxed.canonicalize_body by relaxed_body (same arguments,
# same answers).  tests/test_auth_dkimpy.py
# fails if dkimpy's names or signatures change.

KEY_CACHE_SIZE = 512


@lru_cache(maxsize=KEY_CACHE_SIZE)
def _parsed_key(record: bytes) -> tuple:
    return dkimpy.evaluate_pk(b"", record)


def public_key(name: bytes, record) -> tuple:
    """dkimpy's evaluate_pk(NAME, RECORD): (key, size in bits, k= tag, tlsrpt service),
    parsed once per distinct record.  A record that does not parse raises each time."""
    if isinstance(record, str):
        record = record.encode("ascii")
    if not record:
        return dkimpy.evaluate_pk(name, record)  # its error names the key
    return _parsed_key(bytes(record))


# The keys OpenSSL is asked about: the sizes DKIM uses.  OpenSSL refuses some keys
# outside them (over 16384 bits; a public exponent over 64 bits with a modulus over
# 3072) and reports that as a bad signature: those take dkimpy's way.
_OPENSSL_BITS = (1024, 8192)
_OPENSSL_MAX_EXPONENT = 1 << 32


@lru_cache(maxsize=KEY_CACHE_SIZE)
def _openssl_key(modulus: int, exponent: int):
    return RSAPublicNumbers(exponent, modulus).public_key()


def rsa_verify(hasher, signature: bytes, key: dict) -> bool:
    """What dkimpy's crypto.RSASSA_PKCS1_v1_5_verify(HASHER, SIGNATURE, KEY) answers."""
    modulus, exponent = key["modulus"], key["publicExponent"]
    modlen = max(1, (modulus.bit_length() + 7) // 8)
    expected = dkimcrypto.EMSA_PKCS1_v1_5_encode(hasher, modlen)  # raises as dkimpy does
    value = int.from_bytes(signature, "big")
    if len(signature) == modlen and value < modulus and _OPENSSL_BITS[0] <= modulus.bit_length() <= _OPENSSL_BITS[1] \
            and exponent < _OPENSSL_MAX_EXPONENT:
        try:
            digest_info = _openssl_key(modulus, exponent).recover_data_from_signature(
                bytes(signature), rsa_padding.PKCS1v15(), None)
        except InvalidSignature:
            return False  # not even PKCS #1 type 1 padding: dkimpy's comparison fails too
        except Exception:  # noqa: BLE001 - a key OpenSSL refuses (even modulus, e=1...): as dkimpy does
            pass
        else:
            # OpenSSL checked that the MODLEN bytes were 00 01 FF..FF 00 DIGEST_INFO: rebuilt, they
            # are compared whole with dkimpy's encoding, as dkimpy compares them.
            return expected == b"\x00\x01" + b"\xff" * (modlen - len(digest_info) - 3) + b"\x00" + digest_info
    return pow(value, exponent, modulus).to_bytes(modlen, "big") == expected


_relaxed_uncached = Relaxed.canonicalize_headers


@lru_cache(maxsize=8)
def _relaxed(headers: tuple) -> tuple:
    return tuple(_relaxed_uncached(headers))


def relaxed_headers(headers) -> list:
    """What dkimpy's Relaxed.canonicalize_headers(HEADERS) answers: [(name, value), ...]."""
    return list(_relaxed(tuple((h[0], h[1]) for h in headers)))


_relaxed_body_uncached = Relaxed.canonicalize_body
# Bodies up to this size keep their relaxed form for the next signature (two at most).
RELAXED_BODY_MEMO_BYTES = 1 << 20


@lru_cache(maxsize=2)
def _relaxed_body(body: bytes) -> bytes:
    return _relaxed_body_uncached(body)


def relaxed_body(body):
    """What dkimpy's Relaxed.canonicalize_body(BODY) answers."""
    if isinstance(body, bytes) and len(body) <= RELAXED_BODY_MEMO_BYTES:
        return _relaxed_body(body)
    return _relaxed_body_uncached(body)


dkimpy.RSASSA_PKCS1_v1_5_verify = rsa_verify
Relaxed.canonicalize_headers = staticmethod(relaxed_headers)
Relaxed.canonicalize_body = staticmethod(relaxed_body)


def dkimpy_message(txn) -> tuple[list, bytes]:
    """dkimpy's rfc822_parse of the message as received: (headers, body), parsed once per
    message.  Raises dkimpy's MessageFormatError for a header section it cannot read."""
    cached = txn.facts.scratch.get("dkimpy_message")
    if cached is None or cached[0] != len(txn.headers):
        parsed = dkimpy.rfc822_parse(raw_message(txn.headers, txn.body))
        cached = txn.facts.scratch["dkimpy_message"] = (len(txn.headers), parsed)
    return cached[1]


class _CachedKeys:
    """DomainSigner.verify_sig of dkimpy 1.1, with the key parsed once per record."""

    def verify_sig(self, sig, include_headers, sig_header, dnsfunc):
        name = sig[b"s"] + b"._domainkey." + sig[b"d"] + b"."
        try:
            self.pk, self.keysize, self.ktag, self.seqtlsrpt = public_key(name, dnsfunc(name, timeout=self.timeout))
        except dkimpy.KeyFormatError as e:
            self.logger.error("%s" % e)
            return False
        except binascii.Error as e:
            self.logger.error("KeyFormatError: {0}".format(e))
            return False
        except dkimpy.DnsTimeoutError as e:
            self.logger.error("DnsTimeoutError: Domain: {0} Selector: {1} Error message: {2}".format(
                sig[b"d"], sig[b"s"], e))
            return False
        return self.verify_sig_process(sig, include_headers, sig_header, dnsfunc)

    @classmethod
    def parsed(cls, message: tuple[list, bytes], **kw):
        """A verifier of MESSAGE as dkimpy_message gives it (its own copy of the header list)."""
        verifier = cls(None, **kw)
        headers, body = message
        verifier.headers, verifier.body = [[name, value] for name, value in headers], body
        return verifier


class DkimVerifier(_CachedKeys, dkimpy.DKIM):
    """dkimpy.DKIM, verifying through the adapter."""


class ArcVerifier(_CachedKeys, dkimpy.ARC):
    """dkimpy.ARC, verifying through the adapter."""


def arc_verify(message: tuple[list, bytes], logger=None, dnsfunc=None, minkey: int = 1024):
    """dkimpy.arc_verify of MESSAGE (from dkimpy_message) through the adapter:
    (cv, list of set results, reason)."""
    verifier = ArcVerifier.parsed(message, logger=logger, minkey=minkey, timeout=5)
    try:
        return verifier.verify(dnsfunc=dnsfunc)
    except dkimpy.DKIMException as exc:
        if logger is not None:
            logger.error("%s" % exc)
        return dkimpy.CV_Fail, [], "%s" % exc
