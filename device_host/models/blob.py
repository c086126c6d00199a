"""The model blob: named float/int arrays plus a JSON metadata object in one deterministic zip (npy
entries, no pickle, fixed timestamps so equal contents give equal bytes). It is the store's file
format and the format of the cloud's global model resource, so a device stores what it downloads."""
from __future__ import annotations

import io
import json
import re
import zipfile
from typing import Any

import numpy as np

from walle.protos.errors import InvalidArgument

FORMAT = "walle-model-blob-1"
PARAM_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
DTYPES = frozenset(("float32", "float64", "int32", "int64"))
MAX_PARAMS = 256
HEADER = "meta.json"


def check_params(params: Any) -> dict[str, np.ndarray]:
    """{name: numeric ndarray}, names checked; the arrays are made contiguous numpy copies."""
    if not isinstance(params, dict) or not params:
        raise InvalidArgument(f"params must be a non-empty object of name -> array, got {type(params).__name__}")
    if len(params) > MAX_PARAMS:
        raise InvalidArgument(f"params has {len(params)} arrays; at most {MAX_PARAMS}")
    out = {}
    for name, a in params.items():
        if not isinstance(name, str) or not PARAM_RE.match(name):
            raise InvalidArgument(f"parameter name {name!r} must match {PARAM_RE.pattern}")
        if not isinstance(a, np.ndarray) or a.dtype.name not in DTYPES:
            raise InvalidArgument(f"parameter {name!r} must be a numeric array ({', '.join(sorted(DTYPES))}), "
                                  f"got {type(a).__name__} {getattr(a, 'dtype', '')}")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise InvalidArgument(f"parameter {name!r} holds NaN or infinity")
        out[name] = np.ascontiguousarray(a)
    return out


def check_meta(meta: Any) -> dict:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise InvalidArgument(f"meta must be a JSON object, got {type(meta).__name__}")
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"meta is not JSON: {e}") from None
    return meta


def pack(params: dict[str, np.ndarray], meta: dict | None = None) -> bytes:
    params, meta = check_params(params), check_meta(meta)
    header = {"format": FORMAT, "names": list(params), "meta": meta}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(zipfile.ZipInfo(HEADER, date_time=(1980, 1, 1, 0, 0, 0)),
                    json.dumps(header, sort_keys=True).encode())
        for i, a in enumerate(params.values()):
            with zf.open(zipfile.ZipInfo(f"p{i:03d}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w") as f:
                np.lib.format.write_array(f, a, allow_pickle=False)
    return buf.getvalue()


def read_header(data: bytes) -> dict[str, Any]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            header = json.loads(zf.read(HEADER).decode())
    except Exception as e:  # zip or JSON damage: all mean "not a model blob"
        raise InvalidArgument(f"not a walle model blob: {type(e).__name__}: {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise InvalidArgument(f"not a walle model blob (format {header.get('format') if isinstance(header, dict) else None!r})")
    return header


def unpack(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    header = read_header(data)
    params = {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for i, name in enumerate(header["names"]):
                with zf.open(f"p{i:03d}.npy") as f:
                    params[name] = np.lib.format.read_array(f, allow_pickle=False)
    except Exception as e:
        raise InvalidArgument(f"damaged model blob: {type(e).__name__}: {e}") from None
    return params, header.get("meta") or {}
