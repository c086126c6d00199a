"""Host-API model ops for sandboxed task scripts: a small, data-only API over one scope's
ModelStore. Parameters travel as {name: numpy array} (the channel's ndarray encoding), metadata as a
JSON object the store never interprets. The scripts own architectures, training and the gate.

  model.info(name)                                  -> version, task meta, shapes, sizes, lock state
  model.create(name, params=None, meta=None, resource=None, exist_ok=False, replace=False)
  model.load(name)                                  -> params of M (of M0 while M is write-locked)
  model.begin_update(name)                          -> params of M, copied to the buffer Mbuf
  model.commit(name, params, base_version, meta=None, rows=None)
                                                    (rows: a delta commit, only changed table rows)
  model.discard(name)       model.rollback(name)

`create(resource=...)` stores a down-tunnel resource that is a model blob (the cloud's global
model) without its parameters crossing into the child; its metadata gains
"resource": {"name", "digest"}, which `tunnel.down(name, format="info")` can be compared with."""
from __future__ import annotations

import hashlib
from typing import Any, Callable

from walle.protos.errors import FailedPrecondition, InvalidArgument

from . import blob
from .store import ModelStore, check_name

ResourceFetcher = Callable[[str], bytes]


def make_model_ops(store: ModelStore, fetch_resource: ResourceFetcher | None = None) -> dict[str, Callable[..., Any]]:
    """The op table to register in the host API for one task (its scope's store)."""

    def info(name: str) -> dict:
        return store.info(check_name(name))

    def create(name: str, params: dict | None = None, meta: dict | None = None, resource: str | None = None,
               exist_ok: bool = False, replace: bool = False) -> dict:
        check_name(name)
        if not isinstance(exist_ok, bool) or not isinstance(replace, bool):
            raise InvalidArgument("exist_ok and replace must be true or false")
        if (params is None) == (resource is None):
            raise InvalidArgument("give exactly one of params (with meta) or resource")
        if exist_ok and store.exists(name):
            return store.info(name)
        source = "init"
        if resource is not None:
            if not isinstance(resource, str) or not resource:
                raise InvalidArgument(f"resource must be a resource name, got {resource!r}")
            if fetch_resource is None:
                raise FailedPrecondition("model.create(resource=...) needs the task's 'tunnel' API")
            if meta is not None:
                raise InvalidArgument("meta comes from the resource; do not pass it with resource")
            data = fetch_resource(resource)
            params, meta = blob.unpack(data)
            # provenance, so a task can tell whether a newer version of the resource was published
            meta = dict(meta, resource={"name": resource, "digest": "sha256:" + hashlib.sha256(data).hexdigest()})
            source = f"resource:{resource}"
        return store.create(name, params, meta, source=source, replace=replace)

    def load(name: str) -> dict:
        return store.load(check_name(name), "M")

    def begin_update(name: str) -> dict:
        return store.begin_update(check_name(name))

    def commit(name: str, params: dict, base_version: int, meta: dict | None = None, rows: dict | None = None) -> dict:
        return store.commit(check_name(name), params, meta, base_version, rows)

    def discard(name: str) -> int:
        return store.discard(check_name(name))

    def rollback(name: str) -> dict:
        return store.rollback(check_name(name))

    return {"model.info": info, "model.create": create, "model.load": load, "model.begin_update": begin_update,
            "model.commit": commit, "model.discard": discard, "model.rollback": rollback}
