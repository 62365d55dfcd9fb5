"""The web console's users, their sessions, login throttling, the audit log and the
console's signing key, in the quarantine's database (schema `users_schema_version`).

Passwords are kept as scrypt hashes (hashlib.scrypt: memory-hard, in the standard
library): `scrypt$N$r$p$salt$hash`, salt and hash in base64.  Sessions are random
tokens of which only the SHA-256 is stored, so that a copy of the database opens
no session.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time

from sqlalchemy import Column, Float, Index, Integer, LargeBinary, MetaData, String, Table, Text, delete, func, \
    insert, select, update
from sqlalchemy.engine import Engine

from milterguard.stores import sqlshared

SCHEMA_VERSION = 1
ROLES = ("admin", "viewer")
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 15, 8, 1  # 32 MiB of memory per hash
THROTTLE_WINDOW = 900.0  # seconds: failures counted over, and the lock that follows
MIN_PASSWORD = 10

metadata = MetaData()
version = sqlshared.version_table(metadata, "users_schema_version")

users = Table(
    "console_users", metadata,
    Column("name", String(128), primary_key=True),
    Column("role", String(16), nullable=False),
    Column("password", String(255), nullable=False),
    Column("created_at", Float, nullable=False),
)

sessions = Table(
    "console_sessions", metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("csrf", String(64), nullable=False),
    Column("expires_at", Float, nullable=False),
)

failures = Table(
    "console_login_failures", metadata,
    Column("key", String(300), nullable=False),  # "user:NAME" or "ip:ADDRESS"
    Column("at", Float, nullable=False),
)
Index("console_login_failures_key", failures.c.key, failures.c.at)

audit = Table(
    "console_audit", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("who", String(255), nullable=False),
    Column("action", String(32), nullable=False),  # login, login-failed, release, delete, learn, list-add, ...
    Column("target", Text, nullable=False, default=""),
    Column("detail", Text, nullable=False, default=""),
    Column("client", String(64), nullable=False, default=""),
)
Index("console_audit_at", audit.c.at)

keys = Table(
    "console_keys", metadata,
    Column("name", String(32), primary_key=True),
    Column("secret", LargeBinary, nullable=False),
)


def _upgrade_to_1(conn) -> None:
    for table in (users, sessions, failures, audit, keys):
        table.create(conn, checkfirst=True)
    for index in (*failures.indexes, *audit.indexes):
        index.create(conn, checkfirst=True)


UPGRADES = {1: _upgrade_to_1}
_PG_UPGRADE_LOCK = 0x6D6775736572


class UsersError(Exception):
    """The database failed, or the request is refused (unknown user, bad role...)."""


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            maxmem=128 * 1024 * 1024, dklen=32)
    return "$".join(("scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P),
                     base64.b64encode(salt).decode(), base64.b64encode(digest).decode()))


def check_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             maxmem=128 * 1024 * 1024, dklen=32)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


# A hash to check wrong names against, so that an unknown name takes as long as a wrong password.
_DUMMY = hash_password(secrets.token_hex(8))


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Users:
    """Users, sessions, throttling and audit in ENGINE's database; methods raise UsersError."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        sqlshared.upgrade(engine, version, UPGRADES, SCHEMA_VERSION, _PG_UPGRADE_LOCK, "console users", UsersError)

    @classmethod
    def open(cls, config) -> "Users":
        return cls(sqlshared.open_engine(config, UsersError))

    def _run(self, work):
        return sqlshared.run(self.engine, work, UsersError)

    # ------------------------------------------------------------ users

    def add(self, name: str, role: str, password: str, replace: bool = False) -> None:
        if role not in ROLES:
            raise UsersError(f"role {role!r}: expected one of {', '.join(ROLES)}")
        if not name or len(name) > 128 or any(c.isspace() or not c.isprintable() for c in name):
            raise UsersError(f"user name {name!r}: 1 to 128 printable characters without spaces")
        if len(password) < MIN_PASSWORD:
            raise UsersError(f"the password is too short: at least {MIN_PASSWORD} characters")
        hashed = hash_password(password)

        def work(conn) -> None:
            known = conn.execute(select(users.c.name).where(users.c.name == name)).first()
            if known and not replace:
                raise UsersError(f"user {name!r} exists (--replace sets a new password and role)")
            if known:
                conn.execute(update(users).where(users.c.name == name).values(role=role, password=hashed))
                conn.execute(delete(sessions).where(sessions.c.name == name))
            else:
                conn.execute(insert(users).values(name=name, role=role, password=hashed, created_at=time.time()))

        self._run(work)

    def delete(self, name: str) -> None:
        def work(conn) -> None:
            if not conn.execute(delete(users).where(users.c.name == name)).rowcount:
                raise UsersError(f"no user {name!r}")
            conn.execute(delete(sessions).where(sessions.c.name == name))

        self._run(work)

    def list(self) -> list[dict]:
        stmt = select(users.c.name, users.c.role, users.c.created_at).order_by(users.c.name)
        return self._run(lambda conn: [dict(r) for r in conn.execute(stmt).mappings()])

    # ------------------------------------------------------------ logging in

    def throttled(self, name: str, client: str, limit: int, now: float | None = None) -> bool:
        """Whether NAME or CLIENT failed LIMIT times within the window."""
        since = (now or time.time()) - THROTTLE_WINDOW
        stmt = (select(failures.c.key, func.count()).where(failures.c.key.in_([f"user:{name}", f"ip:{client}"]),
                                                            failures.c.at >= since).group_by(failures.c.key))
        return any(n >= limit for _key, n in self._run(lambda conn: conn.execute(stmt).all()))

    def login(self, name: str, password: str, client: str, limit: int, hours: int) -> tuple[str, str] | None:
        """(session token, role) for a right password; None for a wrong one or a throttled name or
        client.  Both outcomes are in the audit log."""
        if self.throttled(name, client, limit):
            self.note(name[:128], "login-throttled", client=client)
            return None
        stored = self._run(lambda conn: conn.execute(select(users.c.password, users.c.role)
                                                     .where(users.c.name == name)).first())
        if not check_password(password, stored.password if stored else _DUMMY) or stored is None:
            now = time.time()
            self._run(lambda conn: (conn.execute(insert(failures), [{"key": f"user:{name}"[:300], "at": now},
                                                                   {"key": f"ip:{client}", "at": now}]),
                                    conn.execute(delete(failures).where(failures.c.at < now - THROTTLE_WINDOW))))
            self.note(name[:128], "login-failed", client=client)
            return None
        token = secrets.token_urlsafe(32)
        self._run(lambda conn: (conn.execute(insert(sessions).values(
            token_hash=_token_hash(token), name=name, csrf=secrets.token_urlsafe(24),
            expires_at=time.time() + hours * 3600.0)),
            conn.execute(delete(sessions).where(sessions.c.expires_at < time.time()))))
        self.note(name, "login", client=client)
        return token, stored.role

    def session(self, token: str) -> dict | None:
        """{name, role, csrf} of a live session, or None."""
        if not token:
            return None
        stmt = (select(sessions.c.name, sessions.c.csrf, users.c.role)
                .join(users, users.c.name == sessions.c.name)
                .where(sessions.c.token_hash == _token_hash(token), sessions.c.expires_at > time.time()))
        found = self._run(lambda conn: conn.execute(stmt).mappings().first())
        return dict(found) if found else None

    def logout(self, token: str) -> None:
        self._run(lambda conn: conn.execute(delete(sessions).where(sessions.c.token_hash == _token_hash(token))))

    # ------------------------------------------------------------ audit and keys

    def note(self, who: str, action: str, target: str = "", detail: object = "", client: str = "") -> None:
        text = detail if isinstance(detail, str) else json.dumps(detail, ensure_ascii=False)
        self._run(lambda conn: conn.execute(insert(audit).values(at=time.time(), who=who, action=action,
                                                                 target=target, detail=text, client=client)))

    def audit_log(self, limit: int = 100) -> list[dict]:
        stmt = select(audit).order_by(audit.c.id.desc()).limit(limit)
        return self._run(lambda conn: [dict(r) for r in conn.execute(stmt).mappings()])

    def key(self, name: str) -> bytes:
        """The secret NAME (made at first use), shared by every console and the digest."""

        def work(conn) -> bytes:
            found = conn.execute(select(keys.c.secret).where(keys.c.name == name)).scalar()
            if found is None:
                found = secrets.token_bytes(32)
                conn.execute(insert(keys).values(name=name, secret=found))
            return bytes(found)

        return self._run(work)


# ---------------------------------------------------------------- signed links of the digest


def sign_link(key: bytes, message_id: str, rcpt: str, action: str, expires: int) -> str:
    """The token of a digest link: who may do ACTION to MESSAGE_ID, until EXPIRES (epoch seconds)."""
    payload = f"{message_id}|{rcpt.lower()}|{action}|{expires}"
    mac = hmac.new(key, payload.encode(), hashlib.sha256).digest()[:20]
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=") + "." + \
        base64.urlsafe_b64encode(mac).decode().rstrip("=")


def check_link(key: bytes, token: str, now: float | None = None) -> tuple[str, str, str] | None:
    """(message id, recipient, action) of a link signed with KEY and not expired, else None."""
    try:
        body, mac = token.split(".")
        payload = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
        got = base64.urlsafe_b64decode(mac + "=" * (-len(mac) % 4))
        message_id, rcpt, action, expires = payload.split("|")
        expires_at = int(expires)
    except (ValueError, UnicodeDecodeError):
        return None
    want = hmac.new(key, payload.encode(), hashlib.sha256).digest()[:20]
    if not hmac.compare_digest(got, want) or expires_at < (now or time.time()):
        return None
    return message_id, rcpt, action
