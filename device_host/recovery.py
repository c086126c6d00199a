"""Setting a corrupt file aside: the device host never deletes what it cannot read (it may be salvaged by
hand) and never crashes on it. The file (with SQLite's -wal/-shm companions) is renamed to
`<name>.corrupt[-wal|-shm]`, replacing an older copy, and the caller starts afresh and tells the platform."""
from __future__ import annotations

import logging
import os
import pathlib
import sqlite3

log = logging.getLogger("walle.device.recovery")

CORRUPT_SUFFIX = ".corrupt"
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


class CorruptDatabase(sqlite3.DatabaseError):
    """PRAGMA quick_check found damage in a database that opened."""


def is_corruption(error: BaseException) -> bool:
    """True for a damaged or foreign SQLite file; False for a full disk, a lock or permissions, which
    must never get a sound file set aside."""
    if isinstance(error, CorruptDatabase):
        return True
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(error, sqlite3.DatabaseError) and code is not None and code & 0xFF in (_SQLITE_CORRUPT,
                                                                                           _SQLITE_NOTADB)


def set_aside(path: str | os.PathLike, why: str) -> str:
    """Move a corrupt file (and its -wal/-shm files) out of the way; returns a one-line account of it."""
    path = pathlib.Path(path)
    for extra in ("", "-wal", "-shm"):
        src = path.with_name(path.name + extra)
        try:
            os.replace(src, path.with_name(path.name + CORRUPT_SUFFIX + extra))
        except FileNotFoundError:
            pass
    account = f"{path.name} was corrupt ({why}); moved to {path.name}{CORRUPT_SUFFIX}"
    log.error("%s", account)
    return account
