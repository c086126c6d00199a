"""CLI configuration: command-line options, then environment variables, then a TOML file.

File: $WALLE_CONFIG, else ~/.config/walle/config.toml. Keys: platform ("host:port"), data_dir,
actor, operator_token, insecure (bool). Environment: WALLE_PLATFORM, WALLE_DATA_DIR, WALLE_ACTOR,
WALLE_OPERATOR_TOKEN."""
from __future__ import annotations

import getpass
import os
import pathlib
import tomllib

from .errors import InvalidArgument

KEYS = {"platform", "data_dir", "actor", "operator_token", "insecure"}


def config_path() -> pathlib.Path:
    return pathlib.Path(os.environ.get("WALLE_CONFIG") or pathlib.Path.home() / ".config" / "walle" / "config.toml")


def load() -> dict:
    path = config_path()
    cfg: dict = {}
    if path.is_file():
        try:
            cfg = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise InvalidArgument(f"{path}: {e}") from None
        unknown = set(cfg) - KEYS
        if unknown:
            raise InvalidArgument(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(KEYS))}")
    for key in KEYS:
        env = os.environ.get("WALLE_" + key.upper())
        if env:
            cfg[key] = env
    cfg.setdefault("actor", _default_actor())
    return cfg


def _default_actor() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "operator"
