"""The console's pages besides the quarantine: overview, history, symbols, test a message,
lists and the audit log."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse
from starlette.routing import Route

from milterguard.cli.common import CliError
from milterguard.explain import explain_text
from milterguard.stores.history import HistoryError
from milterguard.stores.quarantine import QuarantineError
from milterguard.web.app import back, client, console, need_user, page, posted
from milterguard.web.charts import stacked

RANGES = {"hour": (3600, 300), "day": (86400, 3600), "week": (7 * 86400, 6 * 3600)}
MAX_UPLOAD = 10 * 1024 * 1024


def when(value: float | None) -> str:
    if not value:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))


def _held_count(store) -> int:
    from sqlalchemy import func, select

    from milterguard.stores.quarantine import messages

    return store._run(lambda conn: conn.execute(select(func.count()).select_from(messages)).scalar())


def _history(request: Request):
    return console(request).history


async def overview(request: Request):
    user = need_user(request)
    span = request.query_params.get("range", "day")
    if span not in RANGES:
        span = "day"
    seconds, step = RANGES[span]
    history = _history(request)
    now = time.time()
    try:
        seen = history.overview(seconds, step, now)
        series, top, last_hour, nodes = seen["series"], seen["top"], seen["last_hour"], seen["nodes"]
        held = _held_count(console(request).quarantine)
    except (HistoryError, QuarantineError) as exc:
        raise HTTPException(503, f"the database: {exc}") from None
    chart = stacked(series, step)
    totals = {a: sum(v) for a, v in series["actions"].items()}
    return page(request, "overview.html", user, chart=chart, span=span, ranges=list(RANGES), top=top,
                totals=totals, per_minute=last_hour / 60.0, last_hour=last_hour, nodes=nodes, held=held, now=now)


async def history_list(request: Request):
    user = need_user(request)
    params = request.query_params
    try:
        before = int(params["before"]) if params.get("before") else None
        rows = _history(request).search(params.get("q", "").strip(), params.get("action", "").strip(),
                                        params.get("symbol", "").strip(), 50, before)
    except ValueError:
        raise HTTPException(400, "bad page") from None
    except HistoryError as exc:
        raise HTTPException(503, f"the history: {exc}") from None
    return page(request, "history.html", user, rows=rows, params=params,
                more=rows[-1]["id"] if len(rows) == 50 else None)


async def history_one(request: Request):
    user = need_user(request)
    try:
        found = _history(request).get(int(request.path_params["ident"]))
    except HistoryError as exc:
        raise HTTPException(503, f"the history: {exc}") from None
    if found is None:
        raise HTTPException(404, "no such row in the history (expired?)")
    return page(request, "history_one.html", user, row=found)


async def symbols(request: Request):
    user = need_user(request)
    state = console(request)
    try:
        engine = await run_in_threadpool(state.engine)
        counts = dict(_history(request).top_symbols(0.0))
    except CliError as exc:
        raise HTTPException(500, str(exc)) from None
    except HistoryError as exc:
        raise HTTPException(503, f"the history: {exc}") from None
    rules = sorted(engine.ruleset.rules.values(), key=lambda r: (r.group, r.symbol))
    return page(request, "symbols.html", user, rules=rules, counts=counts,
                groups={name: g.description for name, g in engine.ruleset.groups.items()})


async def test_form(request: Request):
    user = need_user(request)
    return page(request, "test.html", user, result=None)


def _scan(state, raw: bytes, ip: str, helo: str, mail_from: str, rcpts: list[str], name: str) -> tuple[str, object]:
    """`milterguard scan --explain` of RAW: the same build of the envelope, the same engine."""
    from milterguard.cli.scan import build

    args = SimpleNamespace(ip=ip or None, client_name="", helo=helo, mail_from=mail_from or None,
                           rcpt=rcpts, auth="")
    engine = state.engine()
    conn, txn = build(args, raw, 0)
    txn.started = time.monotonic()
    verdict = engine.evaluate(conn, txn)
    return explain_text(verdict, name), verdict


async def test_message(request: Request):
    user = need_user(request)
    form = await posted(request, user, role="")
    upload = form.get("message")
    if upload is None or not hasattr(upload, "read"):
        return page(request, "test.html", user, result=None, problem="choose a .eml file")
    raw = await upload.read(MAX_UPLOAD + 1)
    if len(raw) > MAX_UPLOAD or not raw:
        return page(request, "test.html", user, result=None,
                    problem=f"the file is empty or larger than {MAX_UPLOAD // 1024 // 1024} MiB")
    rcpts = [r.strip() for r in str(form.get("rcpt", "")).split(",") if r.strip()]
    try:
        text, verdict = await run_in_threadpool(_scan, console(request), raw, str(form.get("ip", "")).strip(),
                                                str(form.get("helo", "")).strip(), str(form.get("from", "")).strip(),
                                                rcpts, upload.filename or "upload.eml")
    except CliError as exc:
        raise HTTPException(500, str(exc)) from None
    return page(request, "test.html", user, result=text, verdict=verdict, file=upload.filename)


# ---------------------------------------------------------------- lists


def _lists_backend(config):
    """("files", base) or ("redis", store); CliError when the lists are off."""
    from milterguard.clients.redis_client import get_store

    if config["lists.backend"] == "redis":
        return "redis", get_store(config)
    if not config["lists.dir"]:
        raise CliError("lists.dir is empty: lists are off")
    return "files", Path(config.expand(config["lists.dir"]))


def read_lists(config) -> tuple[str, dict]:
    from milterguard.stores.lists import GLOBAL, KINDS, list_path, read_entries, redis_domains, redis_entries

    kind_of, where = _lists_backend(config)
    if kind_of == "redis":
        domains = [GLOBAL] + redis_domains(where)
        return kind_of, {(d, k): redis_entries(where, k, d) for d in domains for k in KINDS}
    domains = [GLOBAL] + sorted(p.name for p in where.glob("*") if p.is_dir())
    return kind_of, {(d, k): read_entries(list_path(where, k, d)) for d in domains for k in KINDS}


def edit_list(config, change: str, kind: str, domain: str, entries: list[str]) -> list[str]:
    """Add or remove ENTRIES as `milterguard list add|del` does; returns those changed."""
    from milterguard.stores.lists import add_entries, list_path, redis_add, redis_remove, remove_entries

    kind_of, where = _lists_backend(config)
    if kind_of == "redis":
        return (redis_add if change == "add" else redis_remove)(where, kind, domain, entries)
    path = list_path(where, kind, domain)
    return (add_entries if change == "add" else remove_entries)(path, entries)


async def lists(request: Request):
    user = need_user(request)
    from milterguard.clients.redis_client import RedisUnavailable

    try:
        backend, found = await run_in_threadpool(read_lists, console(request).config)
        problem = ""
    except (CliError, RedisUnavailable) as exc:
        backend, found, problem = "", {}, str(exc)
    return page(request, "lists.html", user, backend=backend, lists=found, problem=problem)


async def lists_edit(request: Request):
    user = need_user(request)
    form = await posted(request, user)
    from milterguard.clients.redis_client import RedisUnavailable
    from milterguard.stores.lists import KINDS
    from milterguard.yamlsrc import SourceError

    change, kind = str(form.get("change", "")), str(form.get("kind", ""))
    domain = str(form.get("domain", "")).strip().lower().strip(".")
    entries = [e.strip() for e in str(form.get("entries", "")).replace(",", " ").split() if e.strip()]
    if change not in ("add", "del") or kind not in KINDS or not entries:
        return back(request, "/lists", failed="choose add or delete, allow or block, and at least one entry")
    if domain and ("/" in domain or domain.startswith(".") or ".." in domain):
        return back(request, "/lists", failed=f"bad domain {domain!r}")
    try:
        done = await run_in_threadpool(edit_list, console(request).config, change, kind, domain, entries)
    except (CliError, RedisUnavailable, SourceError) as exc:
        return back(request, "/lists", failed=str(exc))
    console(request).users.note(user["name"], f"list-{change}", f"{kind} {domain or '(global)'}", {"entries": done},
                                client(request))
    verb = "added to" if change == "add" else "removed from"
    return back(request, "/lists", done=f"{', '.join(done) or 'nothing'} {verb} the {kind} list {domain or '(global)'}")


async def audit(request: Request):
    user = need_user(request)
    return page(request, "audit.html", user, rows=console(request).users.audit_log(200))


async def root(request: Request):
    need_user(request)
    return RedirectResponse("/overview", status_code=303)


ROUTES = [
    Route("/", root, methods=["GET"]),
    Route("/overview", overview, methods=["GET"]),
    Route("/history", history_list, methods=["GET"]),
    Route("/history/{ident:int}", history_one, methods=["GET"]),
    Route("/symbols", symbols, methods=["GET"]),
    Route("/test", test_form, methods=["GET"]),
    Route("/test", test_message, methods=["POST"]),
    Route("/lists", lists, methods=["GET"]),
    Route("/lists", lists_edit, methods=["POST"]),
    Route("/audit", audit, methods=["GET"]),
]
