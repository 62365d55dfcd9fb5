"""The quarantine pages: search, one message (headers, symbols, safe preview), release,
delete and learning, one at a time or in bulk; and the pages the digest's signed links open.

Release and learning go through the CLI's own code (cli/quarantine.py: `reinject`, `teach`),
so that the console's release is `milterguard quarantine release`.
"""

from __future__ import annotations

import json
import time

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from milterguard.cli.common import CliError
from milterguard.cli.quarantine import open_teacher, parse_age, reinject, teach
from milterguard.stores.quarantine import AlreadyReleased, NotFound, Query, QuarantineError
from milterguard.stores.users import check_link
from milterguard.web.app import back, client, console, need_user, page, posted, render
from milterguard.web.preview import header_list, preview_document

# form action -> (release?, delete?, learn as)
ACTIONS = {"release": (True, False, ""), "delete": (False, True, ""),
           "release-ham": (True, False, "ham"), "delete-spam": (False, True, "spam")}
MAX_BULK = 200


def _query(params) -> Query:
    try:
        min_score = float(params["min_score"]) if params.get("min_score") else None
        since = time.time() - parse_age(params["since"]) if params.get("since") else None
        limit = max(1, min(500, int(params.get("limit") or 100)))
    except (ValueError, CliError) as exc:
        raise HTTPException(400, f"bad search: {exc}") from None
    return Query(rcpt=params.get("rcpt", "").strip(), sender=params.get("sender", "").strip(), since=since,
                 symbol=params.get("symbol", "").strip(), min_score=min_score, limit=limit)


async def listing(request: Request):
    user = need_user(request)
    params = request.query_params
    store = console(request).quarantine
    try:
        found = await run_in_threadpool(store.list, _query(params))
    except QuarantineError as exc:
        raise HTTPException(503, f"the quarantine store: {exc}") from None
    return page(request, "quarantine.html", user, messages=found, params=params)


async def message(request: Request):
    user = need_user(request)
    ident = request.path_params["ident"]
    store = console(request).quarantine
    try:
        held = store.get(ident)
        raw = store.raw(ident)
        events = store.events(ident)
    except NotFound:
        raise HTTPException(404, f"no message {ident} in the quarantine") from None
    except QuarantineError as exc:
        raise HTTPException(503, f"the quarantine store: {exc}") from None
    return page(request, "message.html", user, held=held, headers=header_list(raw), events=events)


async def preview(request: Request):
    need_user(request)
    ident = request.path_params["ident"]
    try:
        raw = console(request).quarantine.raw(ident)
    except NotFound:
        raise HTTPException(404, f"no message {ident} in the quarantine") from None
    except QuarantineError as exc:
        raise HTTPException(503, f"the quarantine store: {exc}") from None
    from milterguard.web.app import PREVIEW_CSP

    return Response(preview_document(raw), media_type="text/html; charset=utf-8",
                    headers={"Content-Security-Policy": PREVIEW_CSP, "X-Frame-Options": "SAMEORIGIN"})


def act(state, ident: str, action: str, who: str, rcpts: list[str] | None = None, client_ip: str = "") -> str:
    """Do ACTION (a key of ACTIONS) to IDENT as the CLI does; one line saying what was done.
    Raises CliError or QuarantineError."""
    release, delete, label = ACTIONS[action]
    config, store = state.config, state.quarantine
    teacher = open_teacher(config, label) if label else None  # before anything: no Redis, nothing done
    said = []
    if release:
        done = store.release(ident, reinject(config, who), rcpts=rcpts or (), who=who)
        state.users.note(who, "release", ident, {"rcpts": done}, client_ip)
        said.append(f"{ident} released to {', '.join(done) or 'nobody'}")
    if teacher:
        from milterguard.clients.redis_client import RedisUnavailable

        try:
            learned = teach(config, store, ident, label, teacher, who)
        except RedisUnavailable as exc:
            raise CliError(f"{'; '.join(said + [''])}{ident} not learned as {label}: Redis not reachable: {exc}") \
                from None
        state.users.note(who, "learn", ident, {"as": label, "bayes": learned["bayes"]}, client_ip)
        said.append(f"learned as {label} ({learned['bayes']})")
    if delete:
        store.delete(ident, who=who)
        state.users.note(who, "delete", ident, "", client_ip)
        said.append(f"{ident} deleted")
    return "; ".join(said)


async def action(request: Request):
    user = need_user(request)
    form = await posted(request, user)
    ident = request.path_params["ident"]
    what = str(form.get("action", ""))
    if what not in ACTIONS:
        raise HTTPException(400, f"unknown action {what!r}")
    try:
        said = await run_in_threadpool(act, console(request), ident, what, user["name"],
                                       client_ip=client(request))
    except NotFound:
        raise HTTPException(404, f"no message {ident} in the quarantine") from None
    except AlreadyReleased as exc:
        return back(request, f"/quarantine/{ident}", failed=str(exc))
    except (CliError, QuarantineError) as exc:
        return back(request, f"/quarantine/{ident}", failed=str(exc))
    return back(request, "/quarantine" if ACTIONS[what][1] else f"/quarantine/{ident}", done=said)


async def bulk(request: Request):
    user = need_user(request)
    form = await posted(request, user)
    what = str(form.get("action", ""))
    if what not in ACTIONS:
        raise HTTPException(400, f"unknown action {what!r}")
    idents = [str(i) for i in form.getlist("id")][:MAX_BULK]
    if not idents:
        return back(request, "/quarantine", failed="no message chosen")
    done, failed = [], []
    for ident in idents:
        try:
            await run_in_threadpool(act, console(request), ident, what, user["name"], client_ip=client(request))
            done.append(ident)
        except (CliError, QuarantineError) as exc:
            failed.append(f"{ident}: {exc}")
    return back(request, "/quarantine", done=f"{what}: {len(done)} of {len(idents)} done" if done else "",
                 failed="; ".join(failed))


# ---------------------------------------------------------------- the digest's links


def _link(request: Request):
    state = console(request)
    found = check_link(state.users.key("digest"), request.path_params["token"])
    if found is None:
        raise HTTPException(403, "this link is not valid or has expired: ask for a new digest")
    return found


async def digest_page(request: Request):
    ident, rcpt, what = _link(request)
    store = console(request).quarantine
    try:
        held = store.get(ident)
    except NotFound:
        return render(request, "digest.html", {"gone": True, "what": what})
    mine = rcpt in {r.lower() for r in held.rcpts}
    return render(request, "digest.html", {"held": held, "rcpt": rcpt, "what": what, "mine": mine,
                                           "token": request.path_params["token"],
                                           "released": rcpt in {r.lower() for r in held.released}})


async def digest_do(request: Request):
    ident, rcpt, what = _link(request)
    form = await request.form()
    # The signed token in the form is the proof (a cross-site form cannot know it).
    if form.get("token") != request.path_params["token"]:
        raise HTTPException(403, "missing token")
    state = console(request)
    who = f"digest:{rcpt}"
    try:
        held = state.quarantine.get(ident)
        if rcpt not in {r.lower() for r in held.rcpts}:
            raise HTTPException(403, "this message is not held for you")
        if what == "release":
            done = await run_in_threadpool(state.quarantine.release, ident, reinject(state.config, who),
                                           rcpts=[rcpt], who=who)
            state.users.note(who, "release", ident, {"rcpts": done, "by": "digest link"}, client(request))
            said = "released: it is on its way to you"
        else:
            # Deleted for this recipient: the message itself goes when nobody else is waiting for it.
            others = [r for r in held.rcpts if r.lower() != rcpt and r not in held.released]
            if others:
                state.quarantine.note(ident, "dismiss", who, json.dumps({"rcpt": rcpt}))
                state.users.note(who, "dismiss", ident, {"rcpt": rcpt}, client(request))
                said = "removed from your digest"
            else:
                state.quarantine.delete(ident, who=who)
                state.users.note(who, "delete", ident, {"by": "digest link"}, client(request))
                said = "deleted"
    except NotFound:
        return render(request, "digest.html", {"gone": True, "what": what})
    except (CliError, QuarantineError) as exc:
        return render(request, "digest.html", {"failed": str(exc), "what": what}, status=502)
    return render(request, "digest.html", {"said": said, "what": what})


ROUTES = [
    Route("/quarantine", listing, methods=["GET"]),
    Route("/quarantine/bulk", bulk, methods=["POST"]),
    Route("/quarantine/{ident:str}", message, methods=["GET"]),
    Route("/quarantine/{ident:str}/preview", preview, methods=["GET"]),
    Route("/quarantine/{ident:str}/action", action, methods=["POST"]),
    Route("/d/{token:str}", digest_page, methods=["GET"]),
    Route("/d/{token:str}", digest_do, methods=["POST"]),
]
