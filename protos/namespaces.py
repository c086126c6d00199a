"""Which storage (and model) scope a task gets, and when two tasks may share one: the rule both the
platform (at submit) and the device (at install) enforce.

A task's scope is its declared `namespace`, else one derived from its name. Sharing is granted, never
claimed: two different tasks with the same scope must each list the other in `namespace_members`.
A task that declares no namespace lists nobody, so its scope is never shared; a task claiming another
task's namespace is refused unless that task's own manifest names it. (The CoDA tasks coda_filter,
coda_train and coda_infer all declare namespace "coda" with the three of them as members.)
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Protocol, Sequence


class _Manifest(Protocol):   # walle.platform.manifest.Manifest or device_pb2.TaskManifest
    name: str
    namespace: str
    namespace_members: Sequence[str]


def storage_scope(manifest: _Manifest) -> str:
    """The scope a task's storage rows and models live under."""
    return manifest.namespace or re.sub(r"[-_]+", "_", manifest.name).strip("_")


def owns_by_name(manifest: _Manifest) -> bool:
    """The task's scope is the one derived from its own name: another task claiming it is the claimant."""
    return storage_scope(manifest) == re.sub(r"[-_]+", "_", manifest.name).strip("_")


def sharing_problem(manifest: _Manifest, others: Iterable[_Manifest],
                    gives_way: Callable[[_Manifest], bool] | None = None) -> str | None:
    """Why `manifest` may not live next to `others` (other tasks' manifests), or None if it may.
    `gives_way(other)`: that ungranted other is the one to refuse, so it does not count against `manifest`."""
    scope = storage_scope(manifest)
    for other in others:
        if other.name == manifest.name or storage_scope(other) != scope:
            continue
        if gives_way is not None and gives_way(other):
            continue
        if other.name not in manifest.namespace_members or manifest.name not in other.namespace_members:
            return (f"task {manifest.name!r} would share storage namespace {scope!r} with task {other.name!r}, "
                    f"but sharing is granted only when each task lists the other in namespace_members "
                    f"({manifest.name!r} lists {sorted(manifest.namespace_members)}, "
                    f"{other.name!r} lists {sorted(other.namespace_members)})")
    return None
