"""PlatformState on PostgreSQL (psycopg 3): one database shared by several serving replicas.

Release decisions take a transaction-scoped advisory lock, so they run one at a time across every
replica and each sees all earlier ones committed (READ COMMITTED reads the latest commit per
statement) -- the same guarantee SQLite's BEGIN IMMEDIATE gives. Report writes do not take it."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from ..errors import InvalidArgument, Unavailable
from .sql import Conn, SqlState

DECISION_LOCK = 0x57A11E  # pg_advisory_xact_lock key of release decisions


class PostgresState(SqlState):
    placeholder = "%s"
    types = {"int": "BIGINT", "real": "DOUBLE PRECISION", "serial": "BIGSERIAL PRIMARY KEY", "blob": "BYTEA",
             "rowid_col": ", rid BIGSERIAL"}
    rowid = "rid"
    greatest = "GREATEST"

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError:  # pragma: no cover - a dependency of the package
            raise Unavailable("PostgreSQL state needs psycopg: pip install 'psycopg[binary]'") from None
        self._psycopg = psycopg
        super().__init__(url)

    def _connect(self):
        try:
            return self._psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        except self._psycopg.OperationalError as e:
            raise Unavailable(f"cannot reach PostgreSQL at {_redact(self.url)}: {str(e).strip()}") from e
        except self._psycopg.ProgrammingError as e:
            raise InvalidArgument(f"bad PostgreSQL URL {_redact(self.url)}: {e}") from e

    @contextmanager
    def _write(self, c: Conn, serialize: bool) -> Iterator[None]:
        with c.raw.transaction():
            if serialize:
                c.run("SELECT pg_advisory_xact_lock(?)", [DECISION_LOCK])
            yield


def _redact(url: str) -> str:
    """The URL without its password, for error messages."""
    import urllib.parse
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=f"{parts.username}:***@{host}")
    return urllib.parse.urlunsplit(parts)
