"""The full configuration of bench/run.py: what a site runs, for both filters alike.

``f`` (milterguard) and ``g`` (Rspamd) each get, beside their Postfix:

- one nsd on loopback, authoritative for the sender's domain and for the
  domain of an ARC sealer: an SPF record that passes the benchmark's client
  (127.0.0.1), a DMARC record (p=reject), and the DKIM keys of both.  The
  benchmark's message is signed with the first key and sealed with the
  second (tests/support/authmail.py), so that both filters fetch and check
  a DKIM signature, an ARC set, SPF and DMARC against the same server.
  Names outside those zones are refused at once: nothing is asked beyond
  loopback, and neither filter reads /etc/resolv.conf (milterguard's
  ``dns.nameservers``, Rspamd's ``options.dns.nameserver``).
- one redis-server on loopback holding its Bayes tokens, learned before the
  rounds from the same messages: the train split (milterguard/corpus.py) of
  the SpamAssassin spam, ham and hard ham.  milterguard: ``milterguard learn``
  then ``milterguard train`` (its classifier) and ``milterguard fuzzy add``
  of the same spam (its content hashes); Rspamd: ``rspamc learn_spam`` and
  ``learn_ham`` through its controller worker on a loopback port.

:func:`check_auth` reads the symbols of the last scans, so that a run in
which the records were not found, or Bayes was not active, says so instead
of measuring a filter that did less work.  :func:`foreign_peers` lists the
sockets of a set of processes whose peer is not on loopback.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

from support import corpus_dir  # noqa: E402  (bench/run.py put tests/ on sys.path)
from support.authmail import Key, arc_seal, sign  # noqa: E402
from support.dns import NsdServer, Zone  # noqa: E402

from milterguard.corpus import select  # noqa: E402

DKIM_SELECTOR = "bench"
ARC_DOMAIN = "relay.bench.test"
ARC_SELECTOR = "arc"
CLIENT_IP = "127.0.0.1"  # smtp-source connects to Postfix from loopback
LEARN_SPAM = ("spamassassin/spam",)
LEARN_HAM = ("spamassassin/ham", "spamassassin/hard_ham")
# What each filter's scan of the benchmark's message must show in the full configuration.
EXPECTED = ("R_SPF_ALLOW", "R_DKIM_ALLOW", "DMARC_POLICY_ALLOW", "ARC_ALLOW")
BAYES = ("BAYES_SPAM", "BAYES_HAM")
# Learning runs before any round; these bound it.
LEARN_TIMEOUT = 900.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------
# DNS: the zones and the signed message
# ---------------------------------------------------------------------------

def auth_zones(domain: str) -> tuple[list[Zone], Key, Key]:
    """The zones for DOMAIN (SPF, DMARC, a DKIM key) and the ARC sealer; and the two keys."""
    dkim_key, arc_key = Key.generate(2048), Key.generate(2048)
    sender = (Zone(domain)
              .txt("@", f"v=spf1 ip4:{CLIENT_IP} -all")
              .txt("_dmarc", "v=DMARC1; p=reject")
              .txt(f"{DKIM_SELECTOR}._domainkey", dkim_key.record))
    sealer = Zone(ARC_DOMAIN).txt(f"{ARC_SELECTOR}._domainkey", arc_key.record)
    return [sender, sealer], dkim_key, arc_key


def signed_message(raw: bytes, domain: str, dkim_key: Key, arc_key: Key) -> bytes:
    """RAW (LF line ends) signed by DOMAIN and sealed by the ARC sealer, LF line ends again.

    Signed in CRLF form, the form it has on the wire (smtp-source sends
    each line with CRLF).
    """
    crlf = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    signed = sign(crlf, domain, DKIM_SELECTOR, dkim_key)
    sealed = arc_seal(signed, ARC_DOMAIN, ARC_SELECTOR, arc_key,
                      f"spf=pass smtp.mailfrom={domain}; dkim=pass header.d={domain}; dmarc=pass header.from={domain}")
    return sealed.replace(b"\r\n", b"\n")


def start_auth_dns(workdir: Path, message: Path, sender: str, dest: Path) -> NsdServer:
    """nsd for SENDER's domain and the ARC sealer; MESSAGE signed and sealed into DEST."""
    domain = sender.rpartition("@")[2].lower()
    zones, dkim_key, arc_key = auth_zones(domain)
    dest.write_bytes(signed_message(message.read_bytes(), domain, dkim_key, arc_key))
    dest.chmod(0o644)
    return NsdServer(workdir, zones).start()


# ---------------------------------------------------------------------------
# learning: the same messages for both filters
# ---------------------------------------------------------------------------

def train_files(exclude: Path | None = None, limit: int = 0) -> dict[str, list[str]]:
    """The train split of the SpamAssassin spam and ham (hard ham included), without EXCLUDE.

    The benchmark's own message is left out, so that neither filter has
    learned the message it is sent (milterguard would end its scan early on
    the exact content hash of a reported spam).  LIMIT > 0 keeps the first
    LIMIT of each class (a quick run).
    """
    root = corpus_dir()
    skip = exclude.resolve() if exclude else None
    out = {}
    for label, subdirs in (("spam", LEARN_SPAM), ("ham", LEARN_HAM)):
        paths = sorted(p for sub in subdirs for p in (root / sub).glob("*.eml") if p.resolve() != skip)
        out[label] = select([str(p) for p in paths], "train")[:limit or None]
        if not out[label]:
            raise RuntimeError(f"no {label} to learn under {root} (set MILTERGUARD_CORPUS)")
    return out


def _run(cmd: list[str], what: str, ok: tuple[int, ...] = (0,), **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=LEARN_TIMEOUT, **kw)
    if out.returncode not in ok:
        raise RuntimeError(f"{what} failed ({out.returncode}): {(out.stderr or out.stdout)[-2000:]}")
    return out


def learn_milterguard(mg, files: dict[str, list[str]]) -> dict:
    """`milterguard learn`, `train` and `fuzzy add` into the Redis of MG's settings."""
    base = [sys.executable, "-m", "milterguard"]
    opts = ["--etc-dir", str(mg.etc_dir)] + [a for k, v in mg.sets.items() for a in ("--set", f"{k}={v}")]
    env = mg._environ()
    facts: dict = {}
    for label in ("spam", "ham"):
        started = time.monotonic()
        _run(base + ["learn"] + opts + [f"--{label}", "--quiet"] + files[label], f"milterguard learn --{label}",
             env=env, cwd=REPO)
        facts[f"learn_{label}_s"] = round(time.monotonic() - started, 1)
        facts[f"learned_{label}"] = len(files[label])
    started = time.monotonic()
    out = _run(base + ["train"] + opts, "milterguard train", env=env, cwd=REPO)
    facts["train_s"] = round(time.monotonic() - started, 1)
    facts["train_output"] = (out.stdout or out.stderr).strip().splitlines()[-1:]
    started = time.monotonic()
    # Exit status 1: some messages were skipped (fewer than fuzzy.min_words words).
    out = _run(base + ["fuzzy", "add"] + opts + files["spam"], "milterguard fuzzy add", ok=(0, 1), env=env, cwd=REPO)
    facts["fuzzy_add_s"] = round(time.monotonic() - started, 1)
    facts["fuzzy_added"] = sum(1 for line in out.stdout.splitlines() if "\tadded\t" in line)
    if not facts["fuzzy_added"]:
        raise RuntimeError(f"milterguard fuzzy add added nothing: {(out.stderr or out.stdout)[-2000:]}")
    log(f"f: learned {len(files['spam'])} spam in {facts['learn_spam_s']} s, {len(files['ham'])} ham in "
        f"{facts['learn_ham_s']} s; trained in {facts['train_s']} s; fuzzy hashes of {facts['fuzzy_added']} "
        f"spam in {facts['fuzzy_add_s']} s")
    return facts


RSPAMC = "rspamc"


def learn_rspamd(rspamd, redis_client, files: dict[str, list[str]]) -> dict:
    """`rspamc learn_spam` and `learn_ham` through RSPAMD's controller; then the learn counts
    Rspamd keeps in its Redis (hash ``RS``: ``learns_spam``, ``learns_ham``)."""
    facts: dict = {}
    host = f"127.0.0.1:{rspamd.controller_port}"
    for label in ("spam", "ham"):
        started = time.monotonic()
        _run([RSPAMC, "-h", host, "-n", "4", "-t", "60", f"learn_{label}", *files[label]],
             f"rspamc learn_{label}")
        facts[f"learn_{label}_s"] = round(time.monotonic() - started, 1)
        facts[f"sent_{label}"] = len(files[label])
    counts = redis_client.hgetall("RS")
    for label in ("spam", "ham"):
        facts[f"learned_{label}"] = int(counts.get(f"learns_{label}".encode(), 0))
    log(f"g: learn_spam {facts['learn_spam_s']} s ({facts['learned_spam']} of {facts['sent_spam']} learned), "
        f"learn_ham {facts['learn_ham_s']} s ({facts['learned_ham']} of {facts['sent_ham']})")
    return facts


# ---------------------------------------------------------------------------
# checks: did the filters do the work?
# ---------------------------------------------------------------------------

_RSPAMD_SYMBOLS = re.compile(r"\(default: [TF] \([^)]*\): \[[^\]]*\] \[([^\]]*)\]")


def rspamd_symbols(log_text: str) -> list[list[str]]:
    """The symbol names of each scan in an Rspamd log (task lines, in order)."""
    out = []
    for m in _RSPAMD_SYMBOLS.finditer(log_text):
        out.append([s.split("(", 1)[0].strip() for s in m.group(1).split(",") if s.strip()])
    return out


def check_auth(symbols: list[str]) -> list[str]:
    """What is missing from one scan's SYMBOLS for the full configuration (empty: all there)."""
    missing = [s for s in EXPECTED if s not in symbols]
    if not any(s in symbols for s in BAYES):
        missing.append("BAYES_SPAM|BAYES_HAM")
    return missing


def _loopback(addr: str) -> bool:
    host = addr.rsplit(":", 1)[0].strip("[]")
    host = host.split("%", 1)[0]
    return host in ("*", "0.0.0.0", "::", "") or host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1")


def foreign_peers(pids: list[int]) -> list[str]:
    """Sockets of PIDS (TCP and UDP, from `ss`) whose local or peer address is not loopback."""
    if not pids:
        return []
    try:
        out = subprocess.run(["ss", "-tunapH"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return [f"ss failed: {e}"]
    want = {str(p) for p in pids}
    bad = []
    for line in out.splitlines():
        owners = set(re.findall(r"pid=(\d+)", line))
        if not owners & want:
            continue
        fields = line.split()
        if len(fields) < 6:
            continue
        local, peer = fields[4], fields[5]
        if not (_loopback(local) and _loopback(peer)):
            bad.append(line.strip())
    return bad


# ---------------------------------------------------------------------------
# where milterguard's time goes: the engine's own time per check
# ---------------------------------------------------------------------------

def check_timings(mg, message: Path, sender: str, rcpt: str, count: int = 40, warm: int = 5) -> dict:
    """`milterguard scan --json` of MESSAGE COUNT times in one process, with MG's settings
    (its nsd and Redis): the median and the largest time of each check over the last
    COUNT - WARM scans, and of the whole scan.  The same engine as the milter's, without
    the milter protocol and without other messages competing for the interpreter."""
    import json
    import statistics

    cmd = [sys.executable, "-m", "milterguard", "scan", "--json", "--etc-dir", str(mg.etc_dir),
           "--ip", CLIENT_IP, "--helo", "probe.bench.invalid", "--from", sender, "--rcpt", rcpt]
    cmd += [a for k, v in mg.sets.items() for a in ("--set", f"{k}={v}")]
    cmd += [str(message)] * count
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=mg._environ(), cwd=REPO)
    decoder, text, pos, scans = json.JSONDecoder(), out.stdout, 0, []
    while True:
        start = text.find("{", pos)
        if start < 0:
            break
        obj, pos = decoder.raw_decode(text, start)
        scans.append(obj)
    scans = scans[warm:]
    if not scans:
        return {"error": f"scan gave no results ({out.returncode}): {out.stderr[-1000:]}"}
    per: dict[str, list[float]] = {}
    for s in scans:
        for name, ms in (s.get("timings_ms") or {}).items():
            per.setdefault(name, []).append(float(ms))
    rows = sorted(((n, statistics.median(v), max(v)) for n, v in per.items()), key=lambda r: -r[1])
    elapsed = [float(s["elapsed_ms"]) for s in scans if "elapsed_ms" in s]
    return {"scans": len(scans), "elapsed_median_ms": round(statistics.median(elapsed), 2) if elapsed else None,
            "elapsed_max_ms": round(max(elapsed), 2) if elapsed else None,
            "symbols": scans[-1].get("symbols"),
            "checks": [{"check": n, "median_ms": round(m, 3), "max_ms": round(x, 3)} for n, m, x in rows]}
