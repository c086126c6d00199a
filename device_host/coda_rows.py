"""CoDA samples <-> rows of the on-device tables `local` and `outside` (storage namespace "coda").

Task storage holds scalars only, so the list fields of a `Sample` (item_cats, hist_items, hist_cats,
profile) are stored as compact JSON text. The host and the app write rows with `sample_to_row`; the
CoDA task scripts (which cannot import this module inside the sandbox) read them back with the same
rule, and tests use `row_to_sample_dict` to compare. docs/coda-tasks.md documents the tables.
"""
from __future__ import annotations

import json
import math
from typing import Any

from walle.protos import coda_pb2

LIST_COLUMNS = ("item_cats", "hist_items", "hist_cats", "profile")
SCALAR_COLUMNS = ("sample_id", "day", "ts", "label", "item_id")
SAMPLE_COLUMNS = SCALAR_COLUMNS + LIST_COLUMNS
OUTSIDE_STATES = ("new", "kept")
_SCALARS = (str, int, float, bool, type(None))


def _json(values: Any) -> str:
    return json.dumps(list(values), separators=(",", ":"))


def sample_to_row(sample: coda_pb2.Sample, **extra: Any) -> dict[str, Any]:
    """One table row for `sample`; `extra` adds columns (e.g. batch_id="b1", state="new", score=None).

    Raises TypeError for a non-Sample, ValueError for an extra column that is not a scalar or that
    would overwrite a sample column."""
    if not isinstance(sample, coda_pb2.Sample):
        raise TypeError(f"sample must be a coda_pb2.Sample, got {type(sample).__name__}")
    row: dict[str, Any] = {
        "sample_id": sample.sample_id,
        "day": int(sample.day),
        "ts": int(sample.ts),
        "label": float(sample.label),
        "item_id": int(sample.item_id),
    }
    for col in LIST_COLUMNS:
        row[col] = _json(getattr(sample, col))
    for key, value in extra.items():
        if key in row:
            raise ValueError(f"extra column {key!r} would overwrite the sample's own column")
        if not isinstance(value, _SCALARS) or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"extra column {key!r} must be a finite scalar (str, int, float, bool, None), "
                             f"got {value!r}")
        if key == "state" and value not in OUTSIDE_STATES:
            raise ValueError(f"state must be one of {OUTSIDE_STATES}, got {value!r}")
        row[key] = value
    return row


def row_to_sample_dict(row: dict[str, Any]) -> dict[str, Any]:
    """The sample dict (Sample field names, lists decoded) of a stored row; other columns are dropped.

    Raises ValueError naming the row's sample_id and the column when a column is missing or its
    JSON text is not a list."""
    if not isinstance(row, dict):
        raise TypeError(f"row must be a dict, got {type(row).__name__}")
    sid = row.get("sample_id")
    out: dict[str, Any] = {}
    for col in SCALAR_COLUMNS:
        if col not in row:
            raise ValueError(f"row {sid!r} has no column {col!r}")
        out[col] = row[col]
    for col in LIST_COLUMNS:
        text = row.get(col)
        if text is None:
            out[col] = []
            continue
        try:
            value = json.loads(text) if isinstance(text, str) else None
        except ValueError:
            value = None
        if not isinstance(value, list):
            raise ValueError(f"row {sid!r}: column {col!r} must hold a JSON list, got {str(text)[:80]!r}")
        out[col] = value
    return out


__all__ = ["sample_to_row", "row_to_sample_dict", "LIST_COLUMNS", "SAMPLE_COLUMNS", "OUTSIDE_STATES"]
