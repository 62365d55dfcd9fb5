"""Robustness: real mail and mangled mail through every check, none may fail.

Every message of the SpamAssassin corpus (ham, hard_ham, spam; read where
it lies, never copied) and a seeded, time-bounded set of mutants of a
sample of it (tests/support/mangle.py) go through the engine as the milter
would see them: a client at 203.0.113.7 with a HELO, MAIL FROM from the
Return-Path, one recipient, so that the client, envelope and SPF checks run
too, with DNS at the session's nsd that refuses every query at once.  No
message may raise, make a check fail (CHECK_ERROR), run long (CHECK_SLOW,
CHECK_BUDGET_EXCEEDED) or make the engine log an error: each of these is a
bug in the check at fault, even though the session would go on.

The fuzz runs against a real Redis too, so that fuzzy hashing and the
learning checks read every mutant, with allow/block lists and protected
domains set; some mutants get a bad HELO, sender or recipients or an IPv6
client, and half of them come as the milter hands a message over (header
values cut at a NUL, undecodable bytes as U+FFFD, the body in a spool
file).  A failure names the mutant's index:
``python3 tests/test_robustness.py INDEX > mutant.eml`` writes it out.

Also: broken SPF, DMARC, DKIM key and blocklist records served by nsd for
the sender's domain, and the nastiest mutants through a private Postfix,
each of which must get an answer from milterguard and one verdict line.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import re
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

import pytest

if __name__ == "__main__":  # pragma: no cover - writing one mutant out by hand
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.mangle import mutate  # noqa: E402

CORPUS = Path(os.environ.get("MILTERGUARD_CORPUS", "/work/shared/corpus")) / "spamassassin"
KINDS = ("ham", "hard_ham", "spam")
# A longer sweep by hand: MILTERGUARD_FUZZ=SEED:MUTANTS[:SECONDS] (say 7:20000:600).  The
# default runs a fixed count of mutants, however long they take: how far a sweep gets must not
# depend on how busy the machine is.  SECONDS, given by hand, stops a long sweep where it got.
_FUZZ = (os.environ.get("MILTERGUARD_FUZZ") or "20261201:400").split(":")
SEED = int(_FUZZ[0])
MUTANTS = int(_FUZZ[1])
FUZZ_SECONDS = float(_FUZZ[2]) if len(_FUZZ) > 2 else float("inf")
SAMPLE = 150  # corpus messages the mutants are made from
WORKERS = 2
BAD = ("CHECK_ERROR", "CHECK_SLOW", "CHECK_BUDGET_EXCEEDED")
ENVELOPE = {"client_ip": "203.0.113.7", "helo": "mail.example.net", "rcpt": "user@example.org"}


def corpus_files() -> list[Path]:
    files: list[Path] = []
    for kind in KINDS:
        folder = CORPUS / kind
        if folder.is_dir():
            files += sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return files


def fuzz_sample(files: list[Path]) -> list[Path]:
    """A varied sample: multipart, HTML, attachments and plain mail from each kind."""
    rng = random.Random(SEED)
    by_shape: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        head = path.read_bytes()[:8000].lower()
        shape = ("multipart" if b"multipart/" in head else "html" if b"text/html" in head
                 else "attachment" if b"attachment" in head else "plain")
        by_shape[(path.parent.name, shape)].append(path)
    sample: list[Path] = []
    groups = sorted(by_shape)
    per_group = max(1, SAMPLE // len(groups))
    for key in groups:
        sample += rng.sample(by_shape[key], min(per_group, len(by_shape[key])))
    return sample


def mutant(sample: list[Path], index: int) -> tuple[str, Path, bytes]:
    """Mutant INDEX: (mutation names, the message it was made from, its bytes)."""
    rng = random.Random(f"{SEED}-{index}")
    base = sample[rng.randrange(len(sample))]
    name, raw = mutate(base.read_bytes(), rng)
    return name, base, raw


# ------------------------------------------------------------ in the worker processes

_ENGINE = None
_LOGGED: list[str] = []
_SYMBOLS: list[str] = []  # of the last message scanned


class _Errors(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info))[-3000:]
        _LOGGED.append(f"{record.name}: {text}")


def _start_worker(etc_dir: str, sets: list[str]) -> None:
    global _ENGINE
    from milterguard.config import load_config
    from milterguard.engine.core import Engine

    # Errors that any logger reports (milterguard's, or a library's such as dkimpy's)
    # count; milterguard's own at DEBUG, so that a failing check's line carries its traceback.
    logging.getLogger("milterguard").setLevel(logging.DEBUG)
    root = logging.getLogger()
    root.handlers[:] = [_Errors(logging.ERROR)]
    root.setLevel(logging.INFO)
    _ENGINE = Engine.load(load_config(etc_dir=etc_dir, sets=sets))


def scan(raw: bytes, ident: str, envelope: dict | None = None) -> list[str]:
    """What went wrong scanning RAW: the bad symbols with their text, errors logged, an exception.

    ENVELOPE (see `envelope`) may name another client, HELO, sender and recipients,
    and ask for the message as the milter hands it over.
    """
    import tempfile

    from milterguard.model import Connection, Transaction
    from milterguard.milter import _text
    from milterguard.mail.raw import split_message

    env = dict(ENVELOPE, **(envelope or {}))
    _LOGGED.clear()
    try:
        # As `milterguard scan --ip ... --helo ... --rcpt ...` builds them (cli/scan.py build()).
        headers, body = split_message(raw)
        rp = next((v for n, v in headers if n.lower() == "return-path"), "")
        mail_from = env.get("mail_from", rp.strip().strip("<>").strip())
        body_size = len(body)
        if env.get("as_milter"):
            # As milter.py records them: a header value ends at a NUL (libmilter passes C strings),
            # undecodable bytes become U+FFFD; the body is the spool file, left at its end.
            headers = [(_text(n), _text(v.partition("\0")[0])) for n, v in headers]
            spool = tempfile.SpooledTemporaryFile(max_size=64 * 1024)
            spool.write(body)
            body = spool
        conn = Connection(client_ip=env["client_ip"], client_name=f"[{env['client_ip']}]", helo=env["helo"],
                          auth_user=env.get("auth", ""), ident=ident)
        txn = Transaction(mail_from=mail_from, rcpts=list(env.get("rcpts", [env["rcpt"]])), headers=headers,
                          body=body, body_size=body_size)
        txn.started = time.monotonic()
        verdict = _ENGINE.evaluate(conn, txn)
    except Exception:  # noqa: BLE001 - that is what the test looks for
        return ["raised: " + traceback.format_exc()[-3000:]]
    _SYMBOLS[:] = [h.symbol for h in verdict.hits]
    problems = [f"{h.symbol} {','.join(h.options)}: {h.text}" for h in verdict.hits if h.symbol in BAD]
    return problems + [f"logged: {line}" for line in _LOGGED]


_HELOS = ["", "[203.0.113.7]", "[1.2.3.4", "203.0.113.7", "localhost", "xn--", "xn--zz-.com", "a" * 300,
          "ex ample", "\u00e9xample.com", "[IPv6:::1]", "[IPv6:zzzz::1]", ".", "-.com", "a..b", "[]", "\ufffd"]
_SENDERS = ["", "a@", "@b", "a@b@c", "a@xn--zz-.com", "a@[300.1.1.1]", "a@[IPv6:zzzz::1]", "a@[203.0.113.7]",
            '"quoted local"@example.com', "a@" + "x" * 300 + ".com", "postmaster", "a@b.c\u00e9", "a@.", "<>",
            "a@-x-.com", "a@" + "b." * 150 + "com", "\ufffd@\ufffd"]
_RCPTS = [["user@example.org", "x@xn--zz-.com"], ["postmaster"], ["a@[1.2.3.4]"], ["\u00e9@\u00e9.example"],
          ["a@b@c", ""], [f"u{i}@example.org" for i in range(60)]]


def envelope(index: int) -> dict:
    """The envelope of mutant INDEX: mostly the usual one; now and then a bad HELO, sender,
    recipients or an IPv6 client; half of the mutants as the milter hands them over."""
    rng = random.Random(f"{SEED}-envelope-{index}")
    env: dict = {"as_milter": rng.random() < 0.5}
    if rng.random() < 0.3:
        env["helo"] = rng.choice(_HELOS)
    if rng.random() < 0.3:
        env["mail_from"] = rng.choice(_SENDERS)
    if rng.random() < 0.2:
        env["rcpts"] = rng.choice(_RCPTS)
    if rng.random() < 0.2:
        env["client_ip"] = rng.choice(["2001:db8::7", "::ffff:203.0.113.7", "198.51.100.1", "fe80::1"])
    if rng.random() < 0.05:
        env["auth"] = rng.choice(["alice", "\ufffd", "a" * 500])
    return env


def _scan_job(job: tuple[bytes, str, dict]) -> tuple[list[str], list[str]]:
    problems = scan(*job)
    return problems, list(_SYMBOLS)


def _corpus_job(path: str) -> tuple[str, list[str]]:
    return path, scan(Path(path).read_bytes(), Path(path).name)


def _fuzz_job(job: tuple[list[Path], int, float]) -> tuple[int, str, str, list[str] | None]:
    sample, index, deadline = job
    if time.monotonic() > deadline:
        return index, "", "", None
    name, base, raw = mutant(sample, index)
    return index, name, base.name, scan(raw, f"mutant-{index}", envelope(index))


# ------------------------------------------------------------ the tests

# Allow and block lists, so that the list checks compare every mutant's addresses with entries.
LISTS = {
    "allow.map": "lists.sourceforge.net\n2001:db8::/32\nfriend@example.com\n",
    "block.map": "198.51.100.0/24\nspammer@example.net\nxn--80ak6aa92e.com\n",
    "example.org/allow.map": "spamassassin.taint.org\n",
    "example.org/block.map": "yahoo.com\nhotmail.com\n192.0.2.0/24\n",
}


def _pool(tmp_path: Path, sets: list[str]):
    etc = tmp_path / "etc"
    for name, text in LISTS.items():
        (etc / "lists" / name).parent.mkdir(parents=True, exist_ok=True)
        (etc / "lists" / name).write_text(text)
    sets = sets + ["phishing.protected_domains=example.org,paypal.com,spamassassin.org,sourceforge.net"]
    return multiprocessing.get_context("fork").Pool(WORKERS, initializer=_start_worker, initargs=(str(etc), sets))


def _kind(problem: str) -> str:
    """What a problem is: its first line, or for an exception its last (type and message)."""
    lines = problem.strip().splitlines()
    return ("raised: " + lines[-1] if problem.startswith("raised") else lines[0])[:160]


def _summary(failures: list[tuple[str, list[str]]]) -> str:
    """Failures grouped by their kind, one example each."""
    groups: dict[str, list[str]] = defaultdict(list)
    for what, problems in failures:
        for problem in problems:
            groups[_kind(problem)].append(what)
    lines = []
    for first, whats in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        example = next(p for w, ps in failures for p in ps if _kind(p) == first and w == whats[0])
        lines.append(f"{len(whats)} x {first}\n   e.g. {whats[0]}\n   " + "\n   ".join(example.splitlines()[1:][-12:]))
    return "\n".join(lines)


@pytest.mark.slow
def test_every_corpus_message_scans_without_a_check_failing(tmp_path, dns_that_knows_nothing):
    files = corpus_files()
    if not files:
        pytest.skip(f"no corpus at {CORPUS}")
    t0 = time.monotonic()
    with _pool(tmp_path, []) as pool:
        results = pool.map(_corpus_job, [str(p) for p in files], chunksize=25)
    failures = [(path, problems) for path, problems in results if problems]
    assert len(results) == len(files)
    print(f"{len(files)} messages in {time.monotonic() - t0:.1f}s")
    assert not failures, f"{len(failures)} of {len(files)} messages ({time.monotonic() - t0:.1f}s):\n" + _summary(failures)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    from support.redis import RedisServer, redis_available

    if not redis_available():
        yield None
        return
    server = RedisServer.start(tmp_path_factory.mktemp("robust-redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_mangled_mail_scans_without_a_check_failing(tmp_path, dns_that_knows_nothing, redis_server):
    files = corpus_files()
    if not files:
        pytest.skip(f"no corpus at {CORPUS}")
    sample = fuzz_sample(files)
    sets = [f"redis.url={redis_server.url}"] if redis_server is not None else []
    started = time.monotonic()
    with _pool(tmp_path, sets) as pool:
        results = pool.map(_fuzz_job, [(sample, i, started + FUZZ_SECONDS) for i in range(MUTANTS)], chunksize=10)
    done = [r for r in results if r[3] is not None]
    print(f"{len(done)} mutants of seed {SEED} in {time.monotonic() - started:.1f}s")
    failures = [(f"mutant {i} ({name} of {base})", problems) for i, name, base, problems in done if problems]
    assert not failures, f"{len(failures)} of {len(done)} mutants:\n" + _summary(failures)


def test_the_session_dns_answers_a_burst_of_queries_at_once(dns_that_knows_nothing):
    """nsd's response rate limiting must be off: a dropped answer costs a check the full DNS timeout."""
    import dns.message
    import dns.query
    import dns.rcode

    if dns_that_knows_nothing is None:
        pytest.skip("nsd is not installed")
    server = dns_that_knows_nothing
    for i in range(600):
        query = dns.message.make_query(f"_dmarc.example{i % 7}.com", "TXT")
        answer = dns.query.udp(query, "127.0.0.1", port=server.port, timeout=1.0)
        assert answer.rcode() == dns.rcode.REFUSED


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.buffer.write(mutant(fuzz_sample(corpus_files()), int(sys.argv[1]))[2])


@pytest.mark.slow
@pytest.mark.postfix
def test_mangled_mail_through_postfix_gets_a_clear_answer_and_a_verdict(postfix_factory, milterguard_factory, sink):
    """Through the milter protocol: each of the nastiest mutants is delivered (or held) or
    refused with milterguard's own answer, and milterguard logs one verdict for each."""
    from support.mangle import nastiest

    files = corpus_files()
    if not files:
        pytest.skip(f"no corpus at {CORPUS}")
    base = next(p for p in files if p.parent.name == "spam" and b"multipart/" in p.read_bytes()[:5000])
    mg = milterguard_factory(workers=2)
    pf = postfix_factory(mg)
    client = {"ADDR": ENVELOPE["client_ip"], "NAME": "[UNAVAILABLE]"}
    sent = {}
    for index, (name, raw) in enumerate(nastiest(base.read_bytes())):
        msgid = f"robust-{index}@example.test"
        # A Message-ID of our own on top, so that each verdict can be found whatever the mutant did.
        raw = b"Message-ID: <" + msgid.encode() + b">\r\n" + re.sub(rb"(?im)^message-id:", b"X-Old-Message-ID:", raw)
        result = pf.send(raw, sender="sender@example.com", rcpts=[ENVELOPE["rcpt"]], helo=ENVELOPE["helo"],
                         xclient=client)
        sent[msgid] = (name, result)
    deadline = time.monotonic() + 15
    while True:  # the verdicts of the last messages may still be on their way to the log
        verdicts = [v for v in mg.verdicts() if v.get("message_id", "").strip("<>") in sent]
        if len(verdicts) >= len(sent) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    problems = []
    for msgid, (name, result) in sent.items():
        mine = [v for v in verdicts if v.get("message_id", "").strip("<>") == msgid]
        if len(mine) != 1:
            problems.append(f"{name}: {len(mine)} verdict lines, answered {result}")
            continue
        verdict = mine[0]
        bad = [s for s in verdict.symbols if s in BAD]
        if bad:
            problems.append(f"{name}: {bad} in {verdict.line[:300]}")
        if result.code == 250:
            if verdict.action not in ("accept", "tag", "review"):
                problems.append(f"{name}: 250 for action {verdict.action}")
        elif not (verdict.action in ("reject", "tempfail") and result.code in (550, 451, 450, 554)):
            problems.append(f"{name}: {result} for action {verdict.action}")
    assert not problems, "\n".join(problems) + "\n--- milterguard.log ---\n" + mg.log_tail()
    delivered = [m for m, (_, r) in sent.items() if r.code == 250 and
                 next(v for v in verdicts if v.get("message_id", "").strip("<>") == m).action != "review"]
    for msgid in delivered:
        sink.wait_for_message_id(f"<{msgid}>")


# ------------------------------------------------------------ records a sender's DNS may serve

# What a hostile or careless domain publishes: each case domain gets one of each, in turn.
SPF_RECORDS = [
    "v=spf1 include:%{zz} -all", "v=spf1 ip4:999.1.1.1 -all", "v=spf1 a:-- mx/99 ip6:zz::/200 -all",
    "v=spf1 redirect=", "v=spf1 include:{d} -all", "v=spf1 exists:%{i}.%{l1r+}.x ~all", "v=spf1 ptr ?all",
    "v=spf1 ip4:192.0.2.0/33 -all", "v=spf1 " + " ".join(f"a:x{j}.{{d}}" for j in range(15)) + " -all",
    "v=spf1 -all exp=%{zz}", "v=spf1 mx:%{d}%{d}%{d}%{d}%{d}%{d}%{d}%{d} -all", "v=spf1 all all all",
    "v=spf1 +ip4:192.0.2.10/0", "spf2.0/pra ~all", "v=spf1 ip4:192.0.2.10 -all extra=%{", "v=spf1 redirect={d}",
]
DMARC_RECORDS = [
    "v=DMARC1; p=bogus", "v=DMARC1; p=reject; pct=abc", "v=DMARC1; p=reject; adkim=x; aspf=y", "v=DMARC1",
    "v=DMARC1; p=reject; sp=", "v=DMARC1; p=reject; fo=zz; rf=bogus; ri=-1", "v=DMARC1;;;;p=none;=;",
    "v=DMARC1; p=quarantine; t=y", "v=DMARC1; p=reject; pct=-5", "v=DMARC1; p=reject; pct=1000",
    "v=DMARC1; p=reject; rua=mailto:%%%; ruf=,,,", "v=DMARC1; p=none; np=bogus; psd=x", "v=DMARC1 p=reject",
    "v=dmarc1; P=REJECT; ADKIM=S", "v=DMARC1; p=reject; aspf=s; adkim=s; pct=50.5",
]
RBL_ANSWERS = ["127.0.1.2", "127.255.255.255", "10.0.0.1", "127.0.0.1", "127.0.1.106", "0.0.0.0"]


def dkim_keys(good: str) -> list[str]:
    """Key records for selector s1, GOOD being the record of the key that signed."""
    import base64

    p = good.rpartition("p=")[2]
    return ["v=DKIM1; k=rsa; p=!!!notbase64", "v=DKIM1; k=ed25519; p=AAAA", f"v=DKIM1; k=bogus; p={p}",
            f"v=DKIM2; p={p}", "v=DKIM1; p=" + base64.b64encode(bytes(range(256)) * 2).decode(),
            f"v=DKIM1; h=md5; p={p}", f"v=DKIM1; t=s:y:x; s=email; p={p}", f"p={p[:40]}",
            f"v=DKIM1; k=rsa; p={p}; p=AAAA", "garbage", f"v=DKIM1; k=rsa; h=sha1; p={p}", "v=DKIM1; p=;",
            f"v=DKIM1; n=x; g=*; p={p}", "v=DKIM1;;;=;p", good]


@pytest.mark.slow
def test_hostile_dns_records_make_no_check_fail(tmp_path):
    """SPF, DMARC and DKIM/ARC key records and blocklist answers as a sender's own DNS may
    serve them, broken on purpose, through every check: none may fail or log an error."""
    from support.authmail import Key, arc_seal, message, sign
    from support.dns import NsdServer, Zone, nsd_available

    if nsd_available() is not None:
        pytest.skip(nsd_available())
    key = Key.generate()
    keys = dkim_keys(key.record)
    cases = max(len(SPF_RECORDS), len(DMARC_RECORDS), len(keys))
    # Each case its own registrable domain under .test, so that blocklists and DMARC see it alone.
    hostile, dbl = Zone("test"), Zone("dbl.spamhaus.org")
    for i in range(cases):
        d = f"hostile{i}.test"
        hostile.txt(f"hostile{i}", SPF_RECORDS[i % len(SPF_RECORDS)].replace("{d}", d))
        if i % 4 == 0:  # two SPF records
            hostile.txt(f"hostile{i}", "v=spf1 +all")
        hostile.txt(f"_dmarc.hostile{i}", DMARC_RECORDS[i % len(DMARC_RECORDS)])
        hostile.txt(f"s1._domainkey.hostile{i}", keys[i % len(keys)])
        hostile.add(f"hostile{i}", "MX", f"{i} mx{i}.{d}.")
        dbl.add(f"{d}.dbl.spamhaus.org.", "A", RBL_ANSWERS[i % len(RBL_ANSWERS)])
    jobs = []
    for i in range(cases):
        d = f"hostile{i}.test"
        raw = sign(message(from_addr=f"a@{d}", body=f"See http://{d}/x and http://www.{d}/y\r\n"), d, "s1", key)
        if i % 2:
            raw = arc_seal(raw, d, "s1", key, f"spf=pass smtp.mailfrom=a@{d}")
        jobs.append((raw, f"hostile-{i}", {"client_ip": "81.2.69.160", "mail_from": f"a@{d}", "as_milter": bool(i % 3)}))
    with NsdServer(tmp_path / "nsd", [hostile, dbl]) as server:
        with _pool(tmp_path, [f"dns.nameservers={server.address}", "rbl.public=true"]) as pool:
            results = pool.map(_scan_job, jobs)
    failures = [(ident, problems) for (_, ident, _), (problems, _) in zip(jobs, results) if problems]
    assert not failures, _summary(failures)
    # The records were read: each kind of broken record made its check say so.
    seen = {sym for _, symbols in results for sym in symbols}
    for expected in ("R_SPF_PERMFAIL", "DMARC_BAD_POLICY", "R_DKIM_PERMFAIL", "ARC_REJECT", "URIBL_SPAMHAUS_DBL"):
        assert expected in seen, f"{expected} not in {sorted(seen)}"
