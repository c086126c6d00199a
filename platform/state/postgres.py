"""PlatformState on PostgreSQL (psycopg 3): one database shared by several serving replicas.

Release decisions take a transaction-scoped advisory lock, so they run one at a time across every
replica and each sees all earlier ones committed (READ COMMITTED reads the latest commit per
statement) -- the same guarantee SQLite's BEGIN IMMEDIATE gives. Report writes do not take it.

Revision changes are pushed: the transaction that bumps the revision NOTIFYs (delivered on COMMIT),
and a waiter's process LISTENs on one connection of its own, so a release made through one replica
wakes the watchers of every other at once. Polling stays as the slow fallback (every
$WALLE_STATE_FALLBACK_POLL s, default 5, while listening; every 0.2 s while the listening connection
is down and being re-made)."""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from contextlib import contextmanager
from typing import Iterator

from ..errors import InvalidArgument, Unavailable
from .sql import POLL_S, Conn, SqlState

log = logging.getLogger("walle.platform.state")
DECISION_LOCK = 0x57A11E  # pg_advisory_xact_lock key of release decisions
FALLBACK_ENV = "WALLE_STATE_FALLBACK_POLL"


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
        try:
            self.fallback_poll_s = float(os.environ.get(FALLBACK_ENV, "5"))
        except ValueError:
            raise InvalidArgument(f"${FALLBACK_ENV} must be a number of seconds "
                                  f"(got {os.environ[FALLBACK_ENV]!r})") from None
        self.listening = threading.Event()  # set while the LISTEN connection is up
        self.notices_heard = 0  # NOTIFYs received (for tests and benchmarks)
        self._listener: threading.Thread | None = None
        self._closing = threading.Event()
        super().__init__(url)
        # NOTIFY channels are per database, not per schema: the channel names the schema, so
        # states sharing a server in different schemas do not wake each other.
        schema = self.conn.value("SELECT current_schema()")
        self.channel = "walle_revision_" + hashlib.sha256(schema.encode()).hexdigest()[:16]

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

    # -- revision changes pushed ----------------------------------------------------------------
    def _announce(self, c: Conn, revision: int) -> None:
        c.run("SELECT pg_notify(?, ?)", [self.channel, str(revision)])

    def _pushed(self) -> bool:
        return self.listening.is_set()

    def _poll_interval(self) -> float:
        return self.fallback_poll_s if self.listening.is_set() else POLL_S

    def _watch(self) -> None:
        if self._listener is not None:  # the first waiter starts listening
            return
        with self._conns_lock:
            if self._listener is None and not self._closing.is_set():
                self._listener = threading.Thread(target=self._listen, name="walle-state-listen", daemon=True)
                self._listener.start()

    def _listen(self) -> None:
        psycopg = self._psycopg
        while not self._closing.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(self.channel)))
                    self.listening.set()
                    self._signal_change()  # a change made while not listening is found by the re-read
                    while not self._closing.is_set():
                        for _notice in conn.notifies(timeout=1.0):
                            self.notices_heard += 1
                            self._signal_change()
            except Exception as e:  # connection lost: poll faster until listening again
                if not self._closing.is_set():
                    log.warning("revision listener: %s; polling every %.1f s until reconnected", e, POLL_S)
            self.listening.clear()
            self._signal_change()
            self._closing.wait(1.0)

    def close(self) -> None:
        self._closing.set()
        listener = self._listener
        if listener is not None and listener is not threading.current_thread():
            listener.join(timeout=5)
        super().close()


def _redact(url: str) -> str:
    """The URL without its password, for error messages."""
    import urllib.parse
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=f"{parts.username}:***@{host}")
    return urllib.parse.urlunsplit(parts)
