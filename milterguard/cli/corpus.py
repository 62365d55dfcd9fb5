"""Hit rates of each rule on a spam and a ham corpus (rule QA before deployment).

For each symbol: the share of spam and of ham it hits, S/O
(spam% / (spam% + ham%)), and the symbol it overlaps most.  Extra rule files
given as arguments are loaded beside the configured ones; their symbols are
listed first.  Every message is used unless --split takes the train or the
test part, split by a fixed rule on the file name (see `milterguard.corpus`);
weights are tuned on `train`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time

from milterguard.cli.common import CliError, add_dns_option, load_engine, load_offline, report
from milterguard.corpus import Progress, Result, select, symbol_stats
from milterguard.mail.raw import iter_message_files, read_message

_ENGINE = None


def add_arguments(parser) -> None:
    parser.add_argument("rules", nargs="*", metavar="RULES", help="extra rule files to try along with the configured ones")
    parser.add_argument("--spam", action="append", default=[], metavar="DIR", help="spam messages (repeatable)")
    parser.add_argument("--ham", action="append", default=[], metavar="DIR", help="ham messages (repeatable)")
    parser.add_argument("--split", choices=("train", "test", "all"), default="all",
                        help="which part of the corpus: train, test, or all of it (default all)")
    parser.add_argument("--jobs", type=int, default=0, help="worker processes (default: one per CPU)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--markdown", action="store_true", help="a Markdown table (for docs/rules-qa.md)")
    parser.add_argument("--all-symbols", action="store_true", help="with extra rule files: list every symbol, not only theirs")
    parser.add_argument("--progress", action="store_true", default=None, help="draw a progress bar even when stderr is not a terminal")
    add_dns_option(parser)


def _scan(item: tuple[str, str]) -> Result:
    from milterguard.cli.scan import build

    path, label = item
    raw = read_message(path)

    class _Env:
        ip = None
        client_name = ""
        helo = ""
        mail_from = None
        rcpt: list[str] = []
        auth = ""

    conn, txn = build(_Env, raw, 0)
    t0 = time.perf_counter()
    verdict = _ENGINE.evaluate(conn, txn)
    elapsed = time.perf_counter() - t0
    return Result(path, label, verdict.score, verdict.action.label, frozenset(verdict.symbols), elapsed)


def run(args) -> int:
    global _ENGINE
    if not args.spam and not args.ham:
        return report(CliError("give --spam DIR and/or --ham DIR"))
    try:
        config = load_offline(args)
        if args.rules:
            for path in args.rules:
                if not os.path.isfile(path):
                    raise CliError(f"{path}: no such rule file")
            config = config.with_sets([])
            config.values["rules.files"] = list(config.values["rules.files"]) + [os.path.abspath(p) for p in args.rules]
        _ENGINE = load_engine(args, config)
    except CliError as exc:
        return report(exc)
    spam, ham = list(iter_message_files(args.spam)), list(iter_message_files(args.ham))
    items = [(p, "spam") for p in select(spam, args.split)] + [(p, "ham") for p in select(ham, args.split)]
    found = len(spam) + len(ham)
    if not items:
        what = "no messages" if not found else f"none of the {found} messages is in the {args.split} split"
        return report(CliError(f"{what} under {', '.join(args.spam + args.ham)}"))
    jobs = args.jobs or os.cpu_count() or 1
    progress = Progress(len(items), f"{args.split}", enabled=args.progress)
    results: list[Result] = []
    if jobs > 1 and len(items) > 50:
        ctx = multiprocessing.get_context("fork")  # workers inherit the loaded engine
        with ctx.Pool(jobs) as pool:
            for result in pool.imap_unordered(_scan, items, chunksize=16):
                results.append(result)
                progress.step()
    else:
        for item in items:
            results.append(_scan(item))
            progress.step()
    new_symbols = None
    if args.rules and not args.all_symbols:
        new_symbols = {s for s, r in _ENGINE.ruleset.rules.items() if os.path.abspath(r.source.rsplit(":", 1)[0]) in
                       {os.path.abspath(p) for p in args.rules}}
    stats = symbol_stats(results, new_symbols)
    n_spam = sum(1 for r in results if r.label == "spam")
    n_ham = len(results) - n_spam
    th = _ENGINE.config["thresholds"]
    summary = {
        "split": args.split, "spam": n_spam, "ham": n_ham, "found": found,
        "spam_tagged": sum(1 for r in results if r.label == "spam" and r.score >= th["tag"]),
        "spam_review": sum(1 for r in results if r.label == "spam" and r.score >= th["review"]),
        "spam_rejected": sum(1 for r in results if r.label == "spam" and r.score >= th["reject"]),
        "ham_tagged": sum(1 for r in results if r.label == "ham" and r.score >= th["tag"]),
        "ham_review": sum(1 for r in results if r.label == "ham" and r.score >= th["review"]),
        "ham_rejected": sum(1 for r in results if r.label == "ham" and r.score >= th["reject"]),
        "mean_ms": round(1000 * sum(r.elapsed for r in results) / max(len(results), 1), 3),
    }
    hits_of = {st.symbol: st.spam + st.ham for st in symbol_stats(results)}
    rows = []
    for st in stats:
        spam_pct = 100.0 * st.spam / n_spam if n_spam else 0.0
        ham_pct = 100.0 * st.ham / n_ham if n_ham else 0.0
        so = spam_pct / (spam_pct + ham_pct) if spam_pct + ham_pct else 0.0
        # Symbols that hit most messages (R_DKIM_NA, say) overlap with everything and tell nothing.
        top = max(((o, n) for o, n in st.overlaps.items() if hits_of.get(o, 0) < len(results) / 2),
                  key=lambda kv: kv[1], default=("", 0))
        rule = _ENGINE.ruleset.rules.get(st.symbol)
        rows.append({
            "symbol": st.symbol, "weight": rule.weight if rule else 0.0, "spam_pct": round(spam_pct, 2),
            "ham_pct": round(ham_pct, 2), "so": round(so, 3), "spam": st.spam, "ham": st.ham,
            "overlap": top[0], "overlap_pct": round(100.0 * top[1] / max(st.spam + st.ham, 1), 1),
        })
    if args.json:
        print(json.dumps({"summary": summary, "symbols": rows}, indent=1))
        return 0
    if args.markdown:
        print(_markdown(summary, rows))
        return 0
    print(f"{'symbol':<28} {'weight':>6} {'spam%':>7} {'ham%':>7} {'S/O':>6}  overlap")
    for r in rows:
        ov = f"{r['overlap']} {r['overlap_pct']:.0f}%" if r["overlap"] else "-"
        print(f"{r['symbol']:<28} {r['weight']:>6.2f} {r['spam_pct']:>7.2f} {r['ham_pct']:>7.2f} {r['so']:>6.3f}  {ov}")
    s = summary
    def pct(a: int, b: int) -> str:
        return f"{100.0 * a / b:.1f}%" if b else "-"
    print(
        f"\n{_used(s)}; "
        f"spam >= tag {pct(s['spam_tagged'], s['spam'])}, >= review {pct(s['spam_review'], s['spam'])}, "
        f">= reject {pct(s['spam_rejected'], s['spam'])}; "
        f"ham >= tag {pct(s['ham_tagged'], s['ham'])}, >= review {pct(s['ham_review'], s['ham'])}, "
        f">= reject {pct(s['ham_rejected'], s['ham'])}; {s['mean_ms']:.2f} ms/message",
        file=sys.stdout,
    )
    return 0


def _used(summary: dict) -> str:
    """Which messages the figures are of: "train split: 40 spam, 44 ham (84 of 100 messages)"."""
    s = summary
    text = f"{s['split']} split: {s['spam']} spam, {s['ham']} ham"
    if s["spam"] + s["ham"] < s["found"]:
        text += f" ({s['spam'] + s['ham']} of {s['found']} messages)"
    return text


def _markdown(summary: dict, rows: list[dict]) -> str:
    """The summary and the per-symbol table as Markdown."""
    s = summary

    def pct(a: int, b: int) -> str:
        return f"{100.0 * a / b:.1f} %" if b else "-"

    lines = [
        f"{_used(s)}.",
        "",
        "| | spam | ham |",
        "|---|---|---|",
        f"| score >= tag | {pct(s['spam_tagged'], s['spam'])} | {pct(s['ham_tagged'], s['ham'])} |",
        f"| score >= review | {pct(s['spam_review'], s['spam'])} | {pct(s['ham_review'], s['ham'])} |",
        f"| score >= reject | {pct(s['spam_rejected'], s['spam'])} | {pct(s['ham_rejected'], s['ham'])} |",
        "",
        "| symbol | weight | spam % | ham % | S/O | overlaps most with |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ov = f"{r['overlap']} ({r['overlap_pct']:.0f} %)" if r["overlap"] else ""
        lines.append(f"| {r['symbol']} | {r['weight']:g} | {r['spam_pct']:.2f} | {r['ham_pct']:.2f} | {r['so']:.3f} | {ov} |")
    return "\n".join(lines)
