"""Setting a corrupt file aside: the device host never deletes what it cannot read (it may be salvaged by
hand) and never crashes on it. The file (with SQLite's -wal/-shm companions) is renamed to
`<name>.corrupt[-wal|-shm]`, replacing an older copy, and the caller starts afresh and tells the platform."""
from __future__ import annotations

import logging
import os
import pathlib

log = logging.getLogger("walle.device.recovery")

CORRUPT_SUFFIX = ".corrupt"


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
