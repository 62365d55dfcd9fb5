"""The console's ASGI app: its state, the security of every response, sessions, CSRF and login.

Security model (docs/web.md):
- every response carries a Content-Security-Policy that allows nothing but the console's
  own style sheet and images (no script at all, no remote load, no framing);
- a session is a random token in a cookie (HttpOnly, SameSite=Strict, Secure over HTTPS),
  of which the database keeps only the hash;
- every POST form carries the session's CSRF token (the login form a token of its own,
  in a cookie and the form); a POST without it is refused;
- logins are throttled per name and per client address (`web.login_failures`);
- Jinja2 escapes every value; a held message's HTML is never served in the console's
  own documents (preview.py).
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
from pathlib import Path
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from milterguard.cli.common import load_engine
from milterguard.stores.history import History, HistoryError
from milterguard.stores.quarantine import Quarantine, QuarantineError
from milterguard.stores.users import Users, UsersError

log = logging.getLogger("milterguard.web")

HERE = Path(__file__).resolve().parent
COOKIE = "mg_session"
LOGIN_COOKIE = "mg_login"
FLASH = "mg_said"
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
# The preview of a held message: its own document, in a sandboxed frame, that may load nothing.
PREVIEW_CSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'self'; base-uri 'none'; sandbox"
MAX_FORM_BYTES = 32 * 1024 * 1024


class ConsoleError(Exception):
    """The console cannot start (its database, its configuration)."""


class Console:
    """What every request reads: the configuration and the stores of `quarantine.url`."""

    def __init__(self, config, args=None) -> None:
        self.config = config
        self.args = args
        try:
            self.quarantine = Quarantine(config["quarantine.url"])
            self.users = Users(self.quarantine.engine)
            self.history = History(self.quarantine.engine)
        except (QuarantineError, UsersError, HistoryError) as exc:
            raise ConsoleError(str(exc)) from None
        self._engine = None

    def engine(self):
        """The filter's engine, as `milterguard scan` loads it (at first use: it takes a while)."""
        if self._engine is None:
            self._engine = load_engine(None, self.config)
        return self._engine


class SecurityHeaders:
    """Pure ASGI middleware: the headers of every response (a preview sets its own CSP)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def sending(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])]
                names = {k.lower() for k, _v in headers}
                for name, value in ((b"content-security-policy", CSP.encode()),
                                    (b"x-content-type-options", b"nosniff"),
                                    (b"referrer-policy", b"no-referrer"),
                                    (b"x-frame-options", b"DENY"),
                                    (b"cross-origin-opener-policy", b"same-origin"),
                                    (b"cache-control", b"no-store")):
                    if name not in names:
                        headers.append((name, value))
                message = dict(message, headers=headers)
            await send(message)

        await self.app(scope, receive, sending)


def console(request: Request) -> Console:
    return request.app.state.console


def client(request: Request) -> str:
    return request.client.host if request.client else ""


def secure(request: Request) -> bool:
    mode = console(request).config["web.secure_cookies"]
    return mode == "always" or (mode == "auto" and request.url.scheme == "https")


def current_user(request: Request) -> dict | None:
    return console(request).users.session(request.cookies.get(COOKIE, ""))


def need_user(request: Request, role: str = "") -> dict:
    """The session's user, else a redirect to the login page; 403 without ROLE."""
    user = current_user(request)
    if user is None:
        raise HTTPException(303, headers={"Location": "/login?next=" + quote(request.url.path)})
    if role and user["role"] != role:
        raise HTTPException(403, "your role may not do this")
    return user


async def posted(request: Request, user: dict | None, role: str = "admin"):
    """The form of a POST, once its CSRF token is checked (and the user's ROLE)."""
    form = await request.form(max_part_size=MAX_FORM_BYTES)
    want = user["csrf"] if user else request.cookies.get(LOGIN_COOKIE, "")
    if not want or not hmac.compare_digest(str(form.get("csrf", "")), want):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
    if user and role and user["role"] != role:
        console(request).users.note(user["name"], "refused", request.url.path, {"role": user["role"]}, client(request))
        raise HTTPException(403, "your role may not do this")
    return form


def render(request: Request, name: str, context: dict, status: int = 200) -> HTMLResponse:
    context.setdefault("user", None)
    return request.app.state.templates.TemplateResponse(request, name, context, status_code=status)


def page(request: Request, name: str, user: dict, **context) -> HTMLResponse:
    """A page of a logged-in user, with what the last action said (`back`), once."""
    said = _flash(request)
    for key, field in (("notice", "done"), ("problem", "failed")):
        if said.get(field) and not context.get(key):
            context[key] = said[field]
    response = render(request, name, dict(context, user=user, csrf=user["csrf"]))
    if said:
        response.delete_cookie(FLASH, path="/", httponly=True, samesite="strict")
    return response


def _flash(request: Request) -> dict:
    try:
        said = json.loads(request.cookies.get(FLASH, "") or "{}")
    except ValueError:
        return {}
    return {k: str(v) for k, v in said.items() if k in ("done", "failed")} if isinstance(said, dict) else {}


def back(request: Request, path: str, **said: str) -> RedirectResponse:
    """A redirect to PATH after a POST; what it did or what failed is shown by the next page.

    Carried in a cookie of the console, not in the address, so that nobody can make
    the console show a message of theirs with a link."""
    response = RedirectResponse(path, status_code=303)
    said = {k: v[:1000] for k, v in said.items() if v}
    if said:
        response.set_cookie(FLASH, json.dumps(said), max_age=60, path="/", httponly=True, samesite="strict",
                            secure=secure(request))
    return response


# ---------------------------------------------------------------- login


async def login_form(request: Request) -> Response:
    token = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(24)
    response = render(request, "login.html", {"csrf": token, "next": _next(request.query_params.get("next"))})
    response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict", secure=secure(request), path="/login")
    return response


def _next(value: str | None) -> str:
    """Where to go after logging in: a path of the console only."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/"


async def login(request: Request) -> Response:
    form = await posted(request, None)
    state = console(request)
    name, password = str(form.get("name", "")), str(form.get("password", ""))
    done = await run_in_threadpool(state.users.login, name, password, client(request),
                                   state.config["web.login_failures"], state.config["web.session_hours"])
    if done is None:
        return render(request, "login.html", {"csrf": request.cookies.get(LOGIN_COOKIE, ""), "failed": True,
                                              "next": _next(str(form.get("next", "")))}, status=401)
    token, _role = done
    response = RedirectResponse(_next(str(form.get("next", ""))), status_code=303)
    response.set_cookie(COOKIE, token, max_age=state.config["web.session_hours"] * 3600, httponly=True,
                        samesite="strict", secure=secure(request), path="/")
    response.delete_cookie(LOGIN_COOKIE, path="/login")
    return response


async def logout(request: Request) -> Response:
    user = need_user(request)
    await posted(request, user, role="")
    console(request).users.logout(request.cookies.get(COOKIE, ""))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


async def refused(request: Request, exc: HTTPException) -> Response:
    if exc.status_code in (301, 302, 303, 307) and exc.headers:
        return Response(status_code=exc.status_code, headers=exc.headers)
    user = current_user(request)
    return render(request, "error.html", {"status": exc.status_code, "detail": exc.detail, "user": user,
                                          "csrf": user["csrf"] if user else ""}, status=exc.status_code)


def create_app(config, args=None) -> Starlette:
    from milterguard.web import pages, quarantine

    state = Console(config, args)
    routes = [
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        *pages.ROUTES,
        *quarantine.ROUTES,
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)],
                    exception_handlers={HTTPException: refused})
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True)
    templates = Jinja2Templates(env=env)
    templates.env.filters["when"] = pages.when
    app.state.templates = templates
    app.state.console = state
    return app

