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
learning checks read every mutant.  A failure names the mutant's index:
``python3 tests/test_robustness.py INDEX > mutant.eml`` writes it out.
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
# A longer sweep by hand: MILTERGUARD_FUZZ=SEED:MUTANTS:SECONDS (say 7:20000:600).
_FUZZ = (os.environ.get("MILTERGUARD_FUZZ") or "20261201:1500:30").split(":")
SEED = int(_FUZZ[0])
MUTANTS = int(_FUZZ[1])
FUZZ_SECONDS = float(_FUZZ[2])  # the fuzz stops here, however far it got
MIN_MUTANTS = min(MUTANTS, 300)  # and fails if it got less far than this
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


def scan(raw: bytes, ident: str) -> list[str]:
    """What went wrong scanning RAW: the bad symbols with their text, errors logged, an exception."""
    from milterguard.engine.model import Connection, Transaction
    from milterguard.rawmail import split_message

    _LOGGED.clear()
    try:
        # As `milterguard scan --ip ... --helo ... --rcpt ...` builds them (cli/scan.py build()).
        headers, body = split_message(raw)
        rp = next((v for n, v in headers if n.lower() == "return-path"), "")
        conn = Connection(client_ip=ENVELOPE["client_ip"], client_name=f"[{ENVELOPE['client_ip']}]",
                          helo=ENVELOPE["helo"], ident=ident)
        txn = Transaction(mail_from=rp.strip().strip("<>").strip(), rcpts=[ENVELOPE["rcpt"]], headers=headers,
                          body=body, body_size=len(body))
        txn.started = time.monotonic()
        verdict = _ENGINE.evaluate(conn, txn)
    except Exception:  # noqa: BLE001 - that is what the test looks for
        return ["raised: " + traceback.format_exc()[-3000:]]
    problems = [f"{h.symbol} {','.join(h.options)}: {h.text}" for h in verdict.hits if h.symbol in BAD]
    return problems + [f"logged: {line}" for line in _LOGGED]


def _corpus_job(path: str) -> tuple[str, list[str]]:
    return path, scan(Path(path).read_bytes(), Path(path).name)


def _fuzz_job(job: tuple[list[Path], int, float]) -> tuple[int, str, str, list[str] | None]:
    sample, index, deadline = job
    if time.monotonic() > deadline:
        return index, "", "", None
    name, base, raw = mutant(sample, index)
    return index, name, base.name, scan(raw, f"mutant-{index}")


# ------------------------------------------------------------ the tests

def _pool(tmp_path: Path, sets: list[str]):
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    return multiprocessing.get_context("fork").Pool(WORKERS, initializer=_start_worker, initargs=(str(etc), sets))


def _summary(failures: list[tuple[str, list[str]]]) -> str:
    """Failures grouped by their first line, one example each."""
    groups: dict[str, list[str]] = defaultdict(list)
    for what, problems in failures:
        for problem in problems:
            groups[problem.splitlines()[0][:160]].append(what)
    lines = []
    for first, whats in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        example = next(p for w, ps in failures for p in ps if p.splitlines()[0][:160] == first and w == whats[0])
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
    deadline = time.monotonic() + FUZZ_SECONDS
    with _pool(tmp_path, sets) as pool:
        results = pool.map(_fuzz_job, [(sample, i, deadline) for i in range(MUTANTS)], chunksize=10)
    done = [r for r in results if r[3] is not None]
    print(f"{len(done)} mutants of seed {SEED} in {time.monotonic() - deadline + FUZZ_SECONDS:.1f}s")
    failures = [(f"mutant {i} ({name} of {base})", problems) for i, name, base, problems in done if problems]
    assert not failures, f"{len(failures)} of {len(done)} mutants:\n" + _summary(failures)
    assert len(done) >= MIN_MUTANTS, f"only {len(done)} mutants in {FUZZ_SECONDS}s"


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
    from support import wait_until
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
    verdicts = wait_until(lambda: (lambda vs: vs if len(vs) >= len(sent) else None)(
        [v for v in mg.verdicts() if v.get("message_id", "").strip("<>") in sent]), 30,
        what="a verdict for each message", on_timeout=mg.log_tail)
    problems = []
    for msgid, (name, result) in sent.items():
        mine = [v for v in verdicts if v.get("message_id", "").strip("<>") == msgid]
        if len(mine) != 1:
            problems.append(f"{name}: {len(mine)} verdict lines")
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
