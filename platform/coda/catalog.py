"""The item catalog as data: item ids, their categories and any item features (docs/data-layout.md).

`walle cloud catalog load FILE` reads a CSV or Parquet file in the documented layout, keeps category ids
stable across reloads (a name keeps the id it was given first; new names get the next ids, so models
trained on an older catalog still read the same ids), stores the result in the cloud's data folder and
publishes it to devices as the versioned resource `coda/catalog`, next to `coda/global_model`.

Layout (one row per item):
  item_id     integer > 0, unique
  categories  category names separated by "|" (may be empty: the item has no category)
  any other   item features (title, year, price, ...): kept as given and shipped with the catalog
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile

import pandas as pd

from walle.platform.errors import InvalidArgument, NotFound

RESOURCE = "coda/catalog"
FORMAT = 1
SEPARATOR = "|"
MAX_ITEMS = 5_000_000


def read_file(path: str | os.PathLike) -> pd.DataFrame:
    """A catalog file as a DataFrame (CSV by default, Parquet for .parquet/.pq)."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise NotFound(f"catalog file {p} does not exist")
    try:
        if p.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(p)
        return pd.read_csv(p, dtype={"categories": str}, keep_default_na=False)
    except (ValueError, OSError, ImportError) as e:
        raise InvalidArgument(f"catalog file {p} cannot be read: {e}") from None


def _split(value: object) -> list[str]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, (list, tuple)):
        names = [str(v) for v in value]
    else:
        names = str(value).split(SEPARATOR)
    return [n.strip() for n in names if n.strip()]


def _plain(value: object) -> object:
    """A JSON-able scalar for an item feature (NaN -> None, numpy scalars -> Python)."""
    if hasattr(value, "item") and not isinstance(value, (list, tuple, str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def build(frame: pd.DataFrame, previous: dict | None = None) -> dict:
    """The catalog document from a frame in the layout. `previous` (an earlier document) keeps its
    category ids. Raises InvalidArgument naming the first bad row or column."""
    missing = {"item_id", "categories"} - set(frame.columns)
    if missing:
        raise InvalidArgument(f"catalog lacks columns {sorted(missing)}; the layout needs item_id and categories "
                              f"(names separated by {SEPARATOR!r})")
    if len(frame) > MAX_ITEMS:
        raise InvalidArgument(f"catalog has {len(frame)} items; at most {MAX_ITEMS}")
    names: list[str] = list((previous or {}).get("categories", []))
    index = {n: i + 1 for i, n in enumerate(names)}
    items: list[list] = []
    seen: set[int] = set()
    for row, (raw_id, raw_cats) in enumerate(zip(frame["item_id"], frame["categories"])):
        try:
            item = int(raw_id)
            if item != float(raw_id):
                raise ValueError
        except (TypeError, ValueError):
            raise InvalidArgument(f"catalog row {row}: item_id must be an integer, got {raw_id!r}") from None
        if item <= 0 or item >= 2**31:
            raise InvalidArgument(f"catalog row {row}: item_id must be in 1..2^31-1, got {item}")
        if item in seen:
            raise InvalidArgument(f"catalog row {row}: item_id {item} appears twice")
        seen.add(item)
        cats = []
        for name in _split(raw_cats):
            if name not in index:
                names.append(name)
                index[name] = len(names)
            if index[name] not in cats:
                cats.append(index[name])
        items.append([item, cats])
    features = {}
    for col in frame.columns:
        if col in ("item_id", "categories"):
            continue
        features[str(col)] = [_plain(v) for v in frame[col]]
    return {"format": FORMAT, "categories": names, "items": items, "features": features}


def items_frame(doc: dict) -> pd.DataFrame:
    """The document as the table sample generation takes: item_id, genre_ids (category ids >= 1)."""
    return pd.DataFrame({"item_id": pd.Series([i for i, _ in doc["items"]], dtype="int64"),
                         "genre_ids": pd.Series([list(c) for _, c in doc["items"]], dtype=object)})


def empty() -> dict:
    return {"format": FORMAT, "categories": [], "items": [], "features": {}}


def encode(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


class CatalogStore:
    """The current catalog of a cloud data folder: <coda dir>/catalog.json, replaced atomically."""

    def __init__(self, coda_dir: str | os.PathLike):
        self.path = pathlib.Path(coda_dir) / "catalog.json"

    def load(self) -> dict | None:
        try:
            return json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None

    def save(self, doc: dict) -> bytes:
        data = encode(doc)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".catalog-", dir=self.path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return data
