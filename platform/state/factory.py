"""Open the platform state named by a URL: sqlite:///path/state.sqlite3 or postgresql://..."""
from __future__ import annotations

import os
import pathlib

from ..errors import InvalidArgument
from .base import PlatformState

ENV = "WALLE_STATE"


def state_url(data_dir: str | os.PathLike, url: str = "") -> str:
    """The state URL in force: `url`, else $WALLE_STATE, else the SQLite file in the data folder."""
    return url or os.environ.get(ENV, "") or f"sqlite:///{pathlib.Path(data_dir).resolve() / 'state.sqlite3'}"


def open_state(url: str) -> PlatformState:
    if not isinstance(url, str) or not url:
        raise InvalidArgument(f"state URL must be a non-empty string (got {url!r})")
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
        if not path or path == "/":
            raise InvalidArgument(f"state URL {url!r} has no file path (use sqlite:///abs/path/state.sqlite3)")
        from .sqlite import SQLiteState
        return SQLiteState(path)
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresState
        return PostgresState(url)
    raise InvalidArgument(f"state URL {url!r}: use sqlite:///path/state.sqlite3 or postgresql://user@host/db")
