"""The CoDA task library (tasks/_lib/coda) imported on the cloud: one model definition, the same
files the device tasks run in the sandbox. The library imports itself as `coda`, so it is loaded
as that top-level package (the quiet MNN import first: MNN prints a banner on fd 1)."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

from ..demo import tasks_dir


def _import_mnn_quietly() -> None:
    if "MNN" in sys.modules:
        return
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        import MNN  # noqa: F401
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def library_dir():
    return tasks_dir() / "_lib" / "coda"


def load() -> types.ModuleType:
    """The `coda` package (cached in sys.modules). Submodules: `coda_module("din")`."""
    if "coda" in sys.modules:
        return sys.modules["coda"]
    _import_mnn_quietly()
    d = library_dir()
    spec = importlib.util.spec_from_file_location("coda", d / "__init__.py", submodule_search_locations=[str(d)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["coda"] = mod
    spec.loader.exec_module(mod)
    return mod


def coda_module(name: str) -> types.ModuleType:
    load()
    return importlib.import_module(f"coda.{name}")
