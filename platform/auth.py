"""Device credentials: enrollment issues a bearer token bound to a device id; the platform stores
only its SHA-256. Every device-facing RPC carries `authorization: Bearer <token>` metadata."""
from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import threading
import time

import grpc

from .errors import InvalidArgument, NotFound, Unauthenticated
from .state import PlatformState

DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
USER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")  # as allow-list ids (releases.ID_RE)
TOKEN_PREFIX = "wdt1"


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def bearer_token(context) -> str:
    """The bearer token of an RPC's `authorization` metadata ("" if none)."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and value.startswith("Bearer "):
            return value[len("Bearer "):].strip()
    return ""


class DeviceCredentials:
    def __init__(self, state: PlatformState):
        self.state = state
        self._cache: dict[str, tuple[str, int]] = {}  # token hash -> (device id, expires_at)
        self._cache_rev = -1
        self._users: dict[str, str] = {}  # device id -> bound user
        self._users_rev = -1
        self._lock = threading.Lock()

    def enroll(self, device_id: str = "", *, ttl_seconds: int = 0, actor: str = "operator",
               user_id: str = "") -> tuple[str, str]:
        """Issue a device credential. `user_id` binds the device to a user: the platform then uses
        that user (never what the device says) for hit rules, allow-lists, uploads and samples."""
        device_id = device_id or "dev-" + secrets.token_hex(6)
        if not DEVICE_ID_RE.match(device_id):
            raise InvalidArgument(f"device id {device_id!r} is invalid: use 1-128 letters, digits, '.', '_', ':' or '-'")
        if user_id and not USER_ID_RE.match(user_id):
            raise InvalidArgument(f"user id {user_id!r} is invalid: use 1-128 letters, digits, '.', '_', ':', '@' or '-'")
        if ttl_seconds < 0:
            raise InvalidArgument(f"ttl_seconds must be >= 0 (got {ttl_seconds})")
        token = f"{TOKEN_PREFIX}.{secrets.token_urlsafe(32)}"
        now = int(time.time())
        # rounded up, never down: int(now) + 1 could expire a 1 s credential milliseconds after enrollment
        expires = math.ceil(time.time() + ttl_seconds) if ttl_seconds else 0
        with self.state.transaction() as db:
            before = db.execute("SELECT user_id FROM devices WHERE device_id = ?", [device_id]).fetchall()
            # Re-enrolling a device replaces its credential (the old token stops working) and its user.
            db.execute("""INSERT INTO devices (device_id, token_hash, enrolled_at, expires_at, revoked, user_id)
                          VALUES (?, ?, ?, ?, 0, ?)
                          ON CONFLICT(device_id) DO UPDATE SET token_hash=excluded.token_hash,
                          enrolled_at=excluded.enrolled_at, expires_at=excluded.expires_at, revoked=0,
                          user_id=excluded.user_id""",
                       [device_id, _hash(token), now, expires, user_id])
            detail = {"ttl_seconds": ttl_seconds, "user_id": user_id}
            if before and before[0][0] != user_id:
                detail["previous_user_id"] = before[0][0]
            self.state.audit(db, actor, "device.enroll", device_id, detail)
            self.state.bump_revision(db)
        return device_id, token

    def bound_user(self, device_id: str) -> str:
        """The user bound to a device at enrollment ("" if none)."""
        rev = self.state.cached_revision()
        with self._lock:
            if rev != self._users_rev:  # enrollments bump the revision
                self._users.clear()
                self._users_rev = rev
            user = self._users.get(device_id)
        if user is None:
            rows = self.state.db.execute("SELECT user_id FROM devices WHERE device_id = ?", [device_id]).fetchall()
            user = rows[0][0] if rows else ""
            with self._lock:
                self._users[device_id] = user
        return user

    def revoke(self, device_id: str, *, actor: str = "operator") -> dict:
        with self.state.transaction() as db:
            cur = db.execute("UPDATE devices SET revoked = 1 WHERE device_id = ?", [device_id])
            if cur.rowcount == 0:
                raise NotFound(f"unknown device {device_id!r}")
            self.state.audit(db, actor, "device.revoke", device_id)
            self.state.bump_revision(db)
        return self.device(device_id)

    def device(self, device_id: str) -> dict:
        rows = self.state.db.execute_returning_dicts("SELECT * FROM devices WHERE device_id = ?", [device_id])
        if not rows:
            raise NotFound(f"unknown device {device_id!r}")
        return rows[0]

    def devices(self) -> list[dict]:
        return self.state.db.execute_returning_dicts("SELECT * FROM devices ORDER BY device_id")

    def verify(self, token: str) -> str:
        """The device id a token belongs to; Unauthenticated when unknown, revoked or expired."""
        if not token:
            raise Unauthenticated("missing device credential (authorization: Bearer <token>)")
        h = _hash(token)
        rev = self.state.cached_revision()
        with self._lock:
            if rev != self._cache_rev:  # enrollments and revocations bump the revision
                self._cache.clear()
                self._cache_rev = rev
            hit = self._cache.get(h)
        if hit is None:
            rows = self.state.db.execute(
                "SELECT device_id, expires_at, revoked FROM devices WHERE token_hash = ?", [h]).fetchall()
            if not rows or rows[0][2]:
                raise Unauthenticated("unknown or revoked device credential")
            hit = (rows[0][0], rows[0][1])
            with self._lock:
                self._cache[h] = hit
        device_id, expires_at = hit
        if expires_at and time.time() >= expires_at:
            raise Unauthenticated(f"device credential for {device_id!r} expired")
        return device_id

    def authenticate(self, context: grpc.ServicerContext) -> str:
        """The calling device's id, or abort the RPC with UNAUTHENTICATED."""
        try:
            return self.verify(bearer_token(context))
        except Unauthenticated as e:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, e.message)
            raise  # abort raises; keeps type checkers honest

    def touch(self, seen: dict[str, tuple[int, str, dict]]) -> None:
        """Record last-seen time and attributes for many devices in one transaction."""
        if not seen:
            return
        with self.state.transaction() as db:
            for device_id, (ts, app_version, attrs) in seen.items():
                db.execute("UPDATE devices SET last_seen = ?, app_version = ?, attrs = ? WHERE device_id = ?",
                           [ts, app_version, json.dumps(attrs, sort_keys=True), device_id])


OPERATOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
OPERATOR_PREFIX = "wot1"


class OperatorCredentials:
    """Operator tokens for the admin API and the dashboard; separate from device credentials and,
    like them, stored only hashed. The operator's name is the actor in the audit trail."""

    def __init__(self, state: PlatformState):
        self.state = state
        with state.transaction() as db:
            db.execute("""CREATE TABLE IF NOT EXISTS operators (
                name TEXT PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE, created_at INTEGER NOT NULL,
                revoked INTEGER NOT NULL DEFAULT 0)""")

    def create(self, name: str, *, actor: str = "bootstrap") -> str:
        if not OPERATOR_RE.match(name or ""):
            raise InvalidArgument(f"operator name {name!r} is invalid: 1-64 letters, digits, '.', '_', '@' or '-'")
        token = f"{OPERATOR_PREFIX}.{secrets.token_urlsafe(32)}"
        with self.state.transaction() as db:
            db.execute("""INSERT INTO operators (name, token_hash, created_at) VALUES (?, ?, ?)
                          ON CONFLICT(name) DO UPDATE SET token_hash=excluded.token_hash, revoked=0""",
                       [name, _hash(token), int(time.time())])
            self.state.audit(db, actor, "operator.create", name)
        return token

    def revoke(self, name: str, *, actor: str) -> None:
        with self.state.transaction() as db:
            if db.execute("UPDATE operators SET revoked = 1 WHERE name = ?", [name]).rowcount == 0:
                raise NotFound(f"unknown operator {name!r}")
            self.state.audit(db, actor, "operator.revoke", name)

    def any(self) -> bool:
        return bool(self.state.db.execute("SELECT 1 FROM operators WHERE revoked = 0 LIMIT 1").fetchall())

    def verify(self, token: str) -> str:
        """The operator's name, or Unauthenticated."""
        if not token:
            raise Unauthenticated("missing operator credential (authorization: Bearer <operator token>)")
        rows = self.state.db.execute("SELECT name, revoked FROM operators WHERE token_hash = ?",
                                     [_hash(token)]).fetchall()
        if not rows or rows[0][1]:
            raise Unauthenticated("unknown or revoked operator credential")
        return rows[0][0]
