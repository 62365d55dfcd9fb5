"""The adapter to dkimpy (checks/authshared.py): parsed keys kept per record and the RSA
check done by OpenSSL give the answers dkimpy gives on its own; and dkimpy still has the
names and signatures the adapter relies on."""

from __future__ import annotations

import hashlib
import inspect
import random

import dkim
import pytest
from dkim import crypto as dkimcrypto
from dkim.canonicalization import Relaxed

from milterguard.checks import authshared as auth
from support.authmail import Key, arc_seal, engine_for, message, scan, sign
from support.dns import NsdServer, Zone, nsd_available

DOMAIN = "rot.test"
SEALER = "fwd.test"


# ---------------------------------------------------------------- dkimpy's API


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_dkimpy_still_has_what_the_adapter_relies_on():
    # The RSA check is called by its module-level name from verify_sig_process: the one name replaced.
    assert "RSASSA_PKCS1_v1_5_verify" in dkim.DomainSigner.verify_sig_process.__code__.co_names
    assert dkim.RSASSA_PKCS1_v1_5_verify is auth.rsa_verify
    assert _params(dkimcrypto.RSASSA_PKCS1_v1_5_verify) == ["hash", "signature", "public_key"]
    assert _params(dkimcrypto.EMSA_PKCS1_v1_5_encode) == ["hash", "mlen"]
    # verify_sig, which the adapter's classes override, still only loads the key and hands over.
    assert _params(dkim.DomainSigner.verify_sig) == ["self", "sig", "include_headers", "sig_header", "dnsfunc"]
    assert _params(dkim.DomainSigner.verify_sig_process) == _params(dkim.DomainSigner.verify_sig)
    names = set(dkim.DomainSigner.verify_sig.__code__.co_names)
    assert {"load_pk_from_dns", "verify_sig_process"} <= names
    assert names <= {"load_pk_from_dns", "verify_sig_process", "pk", "keysize", "ktag", "seqtlsrpt", "timeout",
                     "KeyFormatError", "logger", "error", "binascii", "Error", "DnsTimeoutError", "format"}
    assert _params(dkim.evaluate_pk) == ["name", "s"]
    assert _params(dkim.arc_verify) == ["message", "logger", "dnsfunc", "minkey", "timeout"]
    assert _params(dkim.ARC.verify) == ["self", "dnsfunc"]
    assert auth.DkimVerifier.verify_sig is auth.ArcVerifier.verify_sig is not dkim.DomainSigner.verify_sig
    # The relaxed header form: replaced by a memo of the same function.
    assert Relaxed.canonicalize_headers is auth.relaxed_headers
    assert _params(auth._relaxed_uncached) == ["headers"]
    assert "canonicalize_headers" in dkim.DomainSigner.verify_sig_process.__code__.co_names
    assert Relaxed.canonicalize_body is auth.relaxed_body
    assert _params(auth._relaxed_body_uncached) == ["body"]
    assert "canonicalize_body" in dkim.DomainSigner.verify_sig_process.__code__.co_names
    # A verifier made from the parsed message: set_message parses with rfc822_parse into headers and body.
    assert _params(dkim.rfc822_parse) == ["message"]
    assert "rfc822_parse" in dkim.DomainSigner.set_message.__code__.co_names
    assert {"headers", "body"} <= set(dkim.DomainSigner.set_message.__code__.co_names)


def test_parsed_message_and_relaxed_headers_are_dkimpys():
    raw = arc_seal(sign(message(from_addr=f"a@{DOMAIN}", extra="X-Folded: one\r\n\t two  \t three\r\n"),
                        DOMAIN, "s1", Key.generate()), SEALER, "arc", Key.generate(), "dkim=pass")
    plain = dkim.DKIM(raw)
    made = auth.DkimVerifier.parsed(dkim.rfc822_parse(raw))
    assert made.headers == plain.headers and made.body == plain.body
    assert vars(made).keys() == vars(plain).keys()
    first = auth.relaxed_headers(plain.headers)
    assert first == auth._relaxed_uncached(plain.headers)
    assert (b"x-folded", b"one two three\r\n") in first
    first.clear()  # a caller's changes to its answer do not reach the next caller
    assert auth.relaxed_headers(plain.headers) == auth._relaxed_uncached(plain.headers)
    assert auth.relaxed_headers([]) == []
    for body in (plain.body, b"", b"\r\n", b"a \t b  \r\n\r\n\r\n", b"x" * (auth.RELAXED_BODY_MEMO_BYTES + 1) + b" \r\n"):
        for _ in range(2):
            assert auth.relaxed_body(body) == auth._relaxed_body_uncached(body)
    assert auth.relaxed_body(b"a \t b  \r\n\r\n") == b"a b\r\n"


# ---------------------------------------------------------------- the RSA check


def _key_dict(key: Key) -> dict:
    pk, _, _, _ = dkim.evaluate_pk(b"k", key.record.encode())
    return pk


def _sign_digest(key: Key, data: bytes) -> bytes:
    return bytes(dkimcrypto.RSASSA_PKCS1_v1_5_sign(hashlib.sha256(data), dkimcrypto.parse_pem_private_key(key.pem)))


def _both(hasher_data: bytes, signature: bytes, pk: dict):
    """(dkimpy's answer, the adapter's answer): a result or the exception's type."""
    out = []
    for fn in (dkimcrypto.RSASSA_PKCS1_v1_5_verify, auth.rsa_verify):
        try:
            out.append(fn(hashlib.sha256(hasher_data), signature, pk))
        except Exception as exc:  # noqa: BLE001 - the same exception is what is compared
            out.append(type(exc))
    return out


def test_rsa_check_answers_as_dkimpy_on_good_and_bad_signatures():
    rng = random.Random(7)
    keys = [Key.generate(1024), Key.generate(2048), Key.generate(1032)]
    seen = set()
    for n in range(60):
        key, other = rng.sample(keys, 2)
        pk = _key_dict(key)
        data = rng.randbytes(rng.randint(0, 300))
        sig = _sign_digest(key, data)
        modulus = pk["modulus"]
        modlen = (modulus.bit_length() + 7) // 8
        flipped = bytearray(sig)
        flipped[rng.randrange(len(sig))] ^= 1 << rng.randrange(8)
        cases = {
            "good": (data, sig, True),
            "other data": (data + b"x", sig, False),
            "bit flipped": (data, bytes(flipped), False),
            "other key": (data, _sign_digest(other, data), False),
            "truncated": (data, sig[:-1], None),
            "leading zero": (data, b"\x00" + sig, None),
            "above the modulus": (data, (int.from_bytes(sig, "big") + modulus).to_bytes(modlen + 1, "big"), None),
            "above, same length": (data, ((int.from_bytes(sig, "big") + modulus) % 256 ** modlen).to_bytes(modlen, "big"),
                                   None),
            "empty": (data, b"", None),
            "all ones": (data, b"\xff" * modlen, None),
        }
        for name, (d, s, want) in cases.items():
            theirs, ours = _both(d, s, pk)
            assert ours == theirs, (n, name)
            if want is not None:
                assert ours is want, (n, name)
            seen.add((name, ours))
    assert ("good", True) in seen and ("bit flipped", False) in seen
    # Keys OpenSSL is not asked about (a large exponent, a small modulus) take dkimpy's way, same answers.
    big_e = {"modulus": pk["modulus"], "publicExponent": (1 << 40) + 15}
    assert _both(b"x", sig, big_e) == [False, False]
    small = {"modulus": (1 << 767) + 5, "publicExponent": 65537}
    assert _both(b"x", b"\x01" * 96, small) == [False, False]
    # A key too small for the digest: both raise the same error (dkimpy makes it a key error).
    tiny = {"modulus": (1 << 255) + 1, "publicExponent": 65537}
    assert _both(b"x", b"\x01" * 32, tiny) == [dkimcrypto.DigestTooLargeError] * 2


# ---------------------------------------------------------------- verdicts through nsd


@pytest.fixture(scope="module")
def keys():
    return {"old": Key.generate(), "new": Key.generate(), "seal": Key.generate()}


def _zones(dkim_key: Key, seal_key: Key) -> list[Zone]:
    # TTL 0: the resolver keeps nothing, so a rotated key is what the next message sees.
    return [Zone(DOMAIN, ttl=0).txt("s1._domainkey", dkim_key.record),
            Zone(SEALER, ttl=0).txt("arc._domainkey", seal_key.record)]


def _signed(key: Key, rng: random.Random, altered: bool, sealed: bool, seal_key: Key) -> bytes:
    body = "".join(rng.choice(["Agenda ", "minutes ", "\t", "  ", "budget\r\n", "q3 "]) for _ in range(rng.randint(1, 80)))
    raw = message(from_addr=f"a@{DOMAIN}", subject=f"Note {rng.random()}", body="Agenda\r\n" + body + "\r\n")
    if rng.random() < 0.5:
        raw = sign(raw, DOMAIN, "s1", key)  # relaxed/simple
    else:  # relaxed/relaxed, the body form the ARC-Message-Signature uses too
        raw = dkim.sign(raw, b"s1", DOMAIN.encode(), key.pem, canonicalize=(b"relaxed", b"relaxed"),
                        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"]) + raw
    if sealed:
        raw = arc_seal(raw, SEALER, "arc", seal_key, f"dkim=pass header.d={DOMAIN}")
    if altered:
        raw = raw.replace(b"Subject: Note", b"Subject: Nota") if rng.random() < 0.5 else raw.replace(b"Agenda", b"AGENDA")
    return raw


def _fresh(raw: bytes, records: dict[bytes, bytes]) -> tuple[bool, bytes]:
    """dkimpy on its own (its RSA check, its key parse): the DKIM answer and the ARC cv."""
    def dnsfunc(name, timeout=5):
        return records[name]
    saved = dkim.RSASSA_PKCS1_v1_5_verify, Relaxed.canonicalize_headers, Relaxed.canonicalize_body
    dkim.RSASSA_PKCS1_v1_5_verify = dkimcrypto.RSASSA_PKCS1_v1_5_verify
    Relaxed.canonicalize_headers = staticmethod(auth._relaxed_uncached)
    Relaxed.canonicalize_body = staticmethod(auth._relaxed_body_uncached)
    try:
        try:
            ok = dkim.DKIM(raw).verify(0, dnsfunc=dnsfunc)
        except dkim.ValidationError:  # a body hash mismatch
            ok = False
        cv, _, _ = dkim.arc_verify(raw, dnsfunc=dnsfunc)
    finally:
        dkim.RSASSA_PKCS1_v1_5_verify = saved[0]
        Relaxed.canonicalize_headers, Relaxed.canonicalize_body = staticmethod(saved[1]), staticmethod(saved[2])
    return ok, cv


@pytest.mark.skipif(nsd_available() is not None, reason=str(nsd_available()))
def test_cached_keys_give_dkimpys_verdicts_and_a_rotated_key_is_picked_up(tmp_path, keys):
    rng = random.Random(11)
    auth._parsed_key.cache_clear()
    with NsdServer(tmp_path / "nsd", _zones(keys["old"], keys["seal"])) as nsd:
        engine = engine_for(tmp_path, f"dns.nameservers={nsd.address}")
        counts = {"pass": 0, "fail": 0, "arc pass": 0}
        for phase, current in (("before", keys["old"]), ("after", keys["new"])):
            if phase == "after":
                nsd.zones = _zones(keys["new"], keys["seal"])  # same selector, new key
                nsd.restart()
            records = {f"s1._domainkey.{DOMAIN}.".encode(): current.record.encode(),
                       f"arc._domainkey.{SEALER}.".encode(): keys["seal"].record.encode()}
            for n in range(30):
                # Mostly the published key; some messages still signed with the retired one.
                signer = current if phase == "before" or rng.random() < 0.7 else keys["old"]
                altered, sealed = rng.random() < 0.3, rng.random() < 0.5
                raw = _signed(signer, rng, altered, sealed, keys["seal"])
                verdict, txn = scan(engine, raw, ip=None)
                ok, cv = _fresh(raw, records)
                assert txn.facts.dkim.result == ("pass" if ok else "fail"), (phase, n)
                assert ok == (signer is current and not altered), (phase, n)
                if sealed:
                    assert txn.facts.arc.result == cv.decode(), (phase, n)
                    counts["arc pass"] += cv == b"pass"
                else:
                    assert "ARC_NA" in verdict.symbols
                counts["pass" if ok else "fail"] += 1
        assert min(counts.values()) >= 3, counts
    info = auth._parsed_key.cache_info()
    assert info.hits > 0 and info.currsize == 3  # old, new and the sealer's: each parsed once
