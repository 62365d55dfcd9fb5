"""Today's lures: the brands map and its check, redirect and wrapper targets, IP addresses in disguise.

The rules of rules/lures.yaml carry their own hit and miss examples (test_rules.py) and case files
(tests/cases/lures, tests/cases/phishing, tests/cases/uri); this file tests the code behind them."""

from __future__ import annotations

import pytest

from milterguard.checks.brands import BrandsMapError, parse_brands
from milterguard.checks.uri import obfuscated_ip
from milterguard.config import load_config
from milterguard.engine.core import Engine, RulesError
from milterguard.mail.message import Message
from milterguard.mail.urls import redirect_target
from milterguard.model import Connection, Transaction
from milterguard.mail.raw import split_message


def test_brands_map_parses_names_and_domains():
    brands = parse_brands("# comment\nwells fargo: wellsfargo.com wf.com\nPayPal: paypal.com  # trailing\n")
    assert brands.domains == {"wells fargo": frozenset({"wellsfargo.com", "wf.com"}), "paypal": frozenset({"paypal.com"})}
    assert brands.pattern.search("Your Wells   Fargo alert").group(1) == "Wells   Fargo"
    assert brands.pattern.search("Amazon and PayPal.com").group(1) == "PayPal"
    assert brands.pattern.search("paypal-login is part of a name") is None
    assert brands.pattern.search("mypaypal account") is None


@pytest.mark.parametrize("line", ["paypal", "paypal: nodots", ": paypal.com"])
def test_brands_map_errors_name_the_line(line):
    with pytest.raises(BrandsMapError, match=r"brands.map:2: expected `name: domain \.\.\.`"):
        parse_brands(f"ok: ok.example\n{line}\n", "brands.map")


def test_a_broken_brands_map_stops_loading_with_its_place(tmp_path):
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "brands.map").write_text("contoso contoso.example\n")
    with pytest.raises(RulesError, match=r"brand_impersonation: .*brands.map:1: expected"):
        Engine.load(load_config(etc_dir=tmp_path, sets=["dns.enabled=false"]))


def verdict(engine, raw: bytes):
    headers, body = split_message(raw)
    txn = Transaction(mail_from="a@mail.example.net", rcpts=["user@example.org"], headers=headers, body=body,
                      body_size=len(body))
    return engine.evaluate(Connection(client_ip="192.0.2.1", client_name="[192.0.2.1]", helo="mx.example.net"), txn)


CONTOSO = (b"From: Contoso Billing <billing@pay-portal.example.net>\nTo: user@example.org\nSubject: Contoso invoice\n"
           b"Date: Mon, 02 Sep 2024 10:00:00 +0000\nMessage-ID: <c@example.net>\n\n"
           b"See https://pay-portal.example.net/contoso for your Contoso invoice.\n")


def test_a_site_brands_map_replaces_the_shipped_one(tmp_path):
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "brands.map").write_text("contoso: contoso.example\n")
    engine = Engine.load(load_config(etc_dir=tmp_path, sets=["dns.enabled=false"]))
    got = set(verdict(engine, CONTOSO).symbols)
    assert {"PHISH_BRAND_NAME", "PHISH_BRAND_SUBJECT", "PHISH_BRAND_TEXT"} <= got
    own = CONTOSO.replace(b"pay-portal.example.net", b"mail.contoso.example")
    assert not {"PHISH_BRAND_NAME", "PHISH_BRAND_SUBJECT", "PHISH_BRAND_TEXT"} & set(verdict(engine, own).symbols)
    off = Engine.load(load_config(etc_dir=tmp_path, sets=["dns.enabled=false", "phishing.brands_map="]))
    assert not {"PHISH_BRAND_NAME", "PHISH_BRAND_SUBJECT"} & set(verdict(off, CONTOSO).symbols)


def test_a_dkim_signer_of_the_brand_owns_the_message(tmp_path):
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "brands.map").write_text("contoso: contoso.example\n")
    engine = Engine.load(load_config(etc_dir=tmp_path, sets=["dns.enabled=false"]))
    signed = CONTOSO.replace(b"Subject:", b"DKIM-Signature: v=1; a=rsa-sha256; d=contoso.example; s=k; b=x\nSubject:")
    assert "PHISH_BRAND_NAME" not in verdict(engine, signed).symbols


@pytest.mark.parametrize("url,target", [
    ("https://www.google.com/url?q=https://evil.example/x&sa=D", "https://evil.example/x"),
    ("https://eur02.safelinks.protection.outlook.com/?url=https%3A%2F%2Fevil.example%2Fa&data=05", "https://evil.example/a"),
    ("https://urldefense.proofpoint.com/v2/url?u=https-3A__evil.example_path&d=DwMF", "https://evil.example/path"),
    ("https://urldefense.com/v3/__https://evil.example/p__;!!abc", "https://evil.example/p"),
    ("https://www.bing.com/ck/a?!&&p=x&u=a1aHR0cHM6Ly9ldmlsLmV4YW1wbGUvcA&ntb=1", "https://evil.example/p"),
    ("https://www.google.com/amp/s/evil.example/p", "https://evil.example/p"),
    ("https://l.facebook.com/l.php?u=https%3A%2F%2Fevil.example%2F&h=AT0", "https://evil.example/"),
    ("https://example.com/search?q=http", None),
    ("https://example.com/page?a=1&b=2", None),
    ("https://www.bing.com/ck/a?u=a1!!!", None),
])
def test_redirect_targets(url, target):
    assert redirect_target(url) == target


def test_redirect_targets_join_the_urls_two_levels_deep():
    inner = "https://www.google.com/url?q=https://paypa1.com/x"
    from urllib.parse import quote
    wrapped = f"https://eur02.safelinks.protection.outlook.com/?url={quote(inner, safe='')}&data=1"
    msg = Message.from_bytes(f"Subject: x\n\nSee {wrapped} now\n".encode())
    assert [(u.host, u.source) for u in msg.urls] == [
        ("eur02.safelinks.protection.outlook.com", "text"), ("www.google.com", "redirect"), ("paypa1.com", "redirect")]


@pytest.mark.parametrize("host,disguised", [
    ("3232235777", True), ("0xc0a80101", True), ("0300.0250.01.01", True), ("0xc0.0xa8.1.1", True),
    ("192.11010305", True), ("192.168.1.1", False), ("1.2.3", False), ("300.1.1.1", False),
    ("example.com", False), ("1.2.3.4.5", False),
])
def test_ip_addresses_in_disguise(host, disguised):
    assert obfuscated_ip(host) is disguised


@pytest.mark.parametrize("name,hit", [("Contoso", True), ("Contoso Billing", True), ("HR via Contoso", True),
                                      ("Weekly Contoso Digest", False), ("Ann Lee (Contoso)", False)])
def test_a_display_name_speaks_as_the_brand_at_its_start_or_end(tmp_path, name, hit):
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "brands.map").write_text("contoso: contoso.example\n")
    engine = Engine.load(load_config(etc_dir=tmp_path, sets=["dns.enabled=false"]))
    raw = CONTOSO.replace(b"Contoso Billing", name.encode())
    assert ("PHISH_BRAND_NAME" in verdict(engine, raw).symbols) is hit
