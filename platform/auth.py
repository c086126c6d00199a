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
        self._users: dict[str, str] = {}  # device id -> bound user
        self._rev = -1  # the revision both caches were last checked against
        self._cred_rev = -1  # the credentials revision they hold
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
        with self.state.transaction() as tx:
            before = tx.device(device_id)
            # Re-enrolling a device replaces its credential (the old token stops working) and its user.
            tx.put_device(device_id, _hash(token), now, expires, user_id)
            detail = {"ttl_seconds": ttl_seconds, "user_id": user_id}
            if before and before["user_id"] != user_id:
                detail["previous_user_id"] = before["user_id"]
            tx.audit(actor, "device.enroll", device_id, detail)
            tx.bump_revision()
        return device_id, token

    def _generation(self) -> int:
        """The credentials revision the caches hold, emptying them first if a credential changed.
        Enrollments and revocations bump the revision AND the credentials revision; a release bumps
        only the first, so the caches survive it (after a release every device would otherwise
        be looked up again, twice, on the hot path)."""
        rev = self.state.cached_revision()
        if rev == self._rev:
            return self._cred_rev
        cred = self.state.credentials_revision()  # read after the revision: at least as new
        with self._lock:
            if cred != self._cred_rev:
                self._cache.clear()
                self._users.clear()
                self._cred_rev = cred
            self._rev = rev
            return cred

    def bound_user(self, device_id: str) -> str:
        """The user bound to a device at enrollment ("" if none)."""
        gen = self._generation()
        user = self._users.get(device_id)
        if user is None:
            row = self.state.device(device_id)
            user = row["user_id"] if row else ""
            with self._lock:
                if self._cred_rev == gen:  # not if a credential changed while we read
                    self._users[device_id] = user
        return user

    def revoke(self, device_id: str, *, actor: str = "operator") -> dict:
        with self.state.transaction() as tx:
            if not tx.revoke_device(device_id):
                raise NotFound(f"unknown device {device_id!r}")
            tx.audit(actor, "device.revoke", device_id)
            tx.bump_revision()
        return self.device(device_id)

    def device(self, device_id: str) -> dict:
        row = self.state.device(device_id)
        if row is None:
            raise NotFound(f"unknown device {device_id!r}")
        return row

    def devices(self) -> list[dict]:
        return self.state.devices()

    def verify(self, token: str) -> str:
        """The device id a token belongs to; Unauthenticated when unknown, revoked or expired."""
        if not token:
            raise Unauthenticated("missing device credential (authorization: Bearer <token>)")
        h = _hash(token)
        gen = self._generation()
        hit = self._cache.get(h)
        if hit is None:
            row = self.state.device_by_token(h)
            if row is None or row["revoked"]:
                raise Unauthenticated("unknown or revoked device credential")
            hit = (row["device_id"], row["expires_at"])
            with self._lock:
                if self._cred_rev == gen:  # not if a credential changed while we read
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
        self.state.touch_devices({device_id: (ts, app_version, json.dumps(attrs, sort_keys=True))
                                  for device_id, (ts, app_version, attrs) in seen.items()})


OPERATOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
OPERATOR_PREFIX = "wot1"


class OperatorCredentials:
    """Operator tokens for the admin API and the dashboard; separate from device credentials and,
    like them, stored only hashed. The operator's name is the actor in the audit trail."""

    def __init__(self, state: PlatformState):
        self.state = state

    def create(self, name: str, *, actor: str = "bootstrap") -> str:
        if not OPERATOR_RE.match(name or ""):
            raise InvalidArgument(f"operator name {name!r} is invalid: 1-64 letters, digits, '.', '_', '@' or '-'")
        token = f"{OPERATOR_PREFIX}.{secrets.token_urlsafe(32)}"
        with self.state.transaction() as tx:
            tx.put_operator(name, _hash(token), int(time.time()))
            tx.audit(actor, "operator.create", name)
        return token

    def revoke(self, name: str, *, actor: str) -> None:
        with self.state.transaction() as tx:
            if not tx.revoke_operator(name):
                raise NotFound(f"unknown operator {name!r}")
            tx.audit(actor, "operator.revoke", name)

    def any(self) -> bool:
        return self.state.any_operator()

    def verify(self, token: str) -> str:
        """The operator's name, or Unauthenticated."""
        if not token:
            raise Unauthenticated("missing operator credential (authorization: Bearer <operator token>)")
        row = self.state.operator_by_token(_hash(token))
        if row is None or row["revoked"]:
            raise Unauthenticated("unknown or revoked operator credential")
        return row["name"]
