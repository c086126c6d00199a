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


def split_store_url(url: str, what: str, filename: str) -> tuple[str, str]:
    """("sqlite", file path) or ("postgresql", url) of a store URL; a clear error for anything else.
    `what` names the store in messages, `filename` is the example file name."""
    if not isinstance(url, str) or not url:
        raise InvalidArgument(f"{what} URL must be a non-empty string (got {url!r})")
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
        if not path or path == "/":
            raise InvalidArgument(f"{what} URL {url!r} has no file path (use sqlite:///abs/path/{filename})")
        return "sqlite", path
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql", url
    raise InvalidArgument(f"{what} URL {url!r}: use sqlite:///path/{filename} or postgresql://user@host/db")


def open_state(url: str) -> PlatformState:
    kind, target = split_store_url(url, "state", "state.sqlite3")
    if kind == "sqlite":
        from .sqlite import SQLiteState
        return SQLiteState(target)
    from .postgres import PostgresState
    return PostgresState(target)
