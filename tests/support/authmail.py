"""Signed mail for the authentication tests: keys, DKIM signatures, ARC seals,
and a scan through the engine as the milter would run it.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from milterguard.config import load_config
from milterguard.engine.core import Engine
from milterguard.model import Connection, Transaction
from milterguard.mail.raw import split_message


@dataclass
class Key:
    """An RSA key pair: the private key in PEM, the DNS record of the public one."""

    pem: bytes
    record: str

    @classmethod
    def generate(cls, bits: int = 1024) -> "Key":
        private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        der = private.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
        return cls(pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode())


def message(from_addr: str = "alice@example.test", to: str = "bob@dest.test", subject: str = "Minutes",
            body: str = "The minutes of today's call are in the wiki.\r\n", extra: str = "") -> bytes:
    return (
        f"From: Alice <{from_addr}>\r\n"
        f"To: <{to}>\r\n"
        f"Subject: {subject}\r\n"
        "Date: Mon, 02 Jan 2023 10:00:00 +0000\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@example.test>\r\n"
        f"{extra}"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        f"{body}"
    ).encode()


def sign(raw: bytes, domain: str, selector: str, key: Key) -> bytes:
    """RAW with a DKIM-Signature of DOMAIN/SELECTOR on top."""
    sig = dkim.sign(raw, selector.encode(), domain.encode(), key.pem,
                    include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return sig + raw


def arc_seal(raw: bytes, domain: str, selector: str, key: Key, results: str) -> bytes:
    """RAW as forwarded by DOMAIN: its Authentication-Results, then an ARC set sealing it."""
    raw = f"Authentication-Results: {domain}; {results}\r\n".encode() + raw
    return b"".join(dkim.arc_sign(raw, selector.encode(), domain.encode(), key.pem, domain.encode())) + raw


def engine_for(tmp_path, *sets: str) -> Engine:
    etc = tmp_path / f"etc{abs(hash(sets))}"
    etc.mkdir(parents=True, exist_ok=True)
    return Engine.load(load_config(etc_dir=etc, sets=list(sets)), strict=True)


def scan_local(engine: Engine, raw: bytes, mail_from: str = "a@example.org"):
    """Every stage of RAW through ENGINE with no client address, as `milterguard scan` of a file
    without --ip: (verdict, transaction)."""
    headers, body = split_message(raw)
    txn = Transaction(mail_from=mail_from, rcpts=["user@example.net"], headers=headers, body=body,
                      body_size=len(body))
    return engine.evaluate(Connection(client_name="localhost", ident="t"), txn), txn


def scan(engine: Engine, raw: bytes, ip: str | None = "192.0.2.10", mail_from: str | None = None,
         helo: str = "mail.example.test", macros: dict | None = None):
    """Every stage of RAW through ENGINE; (verdict, transaction)."""
    headers, body = split_message(raw)
    if mail_from is None:
        mail_from = next((v for n, v in headers if n.lower() == "from"), "").rpartition("<")[2].rstrip(">").strip()
    conn = Connection(client_ip=ip, client_name=f"[{ip}]" if ip else "localhost", helo=helo,
                      macros=dict(macros or {}))
    txn = Transaction(mail_from=mail_from, rcpts=["bob@dest.test"], headers=headers, body=body, body_size=len(body))
    verdict = engine.evaluate(conn, txn)
    return verdict, txn


def options(verdict, symbol: str) -> list[str]:
    hit = verdict.hit(symbol)
    return hit.options if hit else []
