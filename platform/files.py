"""Crash-safe file writes for the platform's folders."""
from __future__ import annotations

import os
import pathlib
import tempfile


def write_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so that a reader never sees a half-written file and a crash leaves at
    most a `.tmp-*` file beside it (fsync, then rename over the target)."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
