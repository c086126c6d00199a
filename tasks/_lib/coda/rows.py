"""The on-device tables `local` and `outside` (storage namespace "coda") and the tasks' settings.

Task storage holds scalars only, so a sample's list fields (item_cats, hist_items, hist_cats,
profile) are stored as compact JSON text; `sample` turns a row back into the sample dict the
features take. Rows of `outside` also carry batch_id, state ("new" | "kept") and score."""
import json

from walle import config, storage

from coda.features import short

LIST_COLUMNS = ("item_cats", "hist_items", "hist_cats", "profile")
PAGE = 1000
ID_CHUNK = 500


def settings():
    """The release's task config (declared in task.toml, set per release, checked by the platform),
    plus the rules across parameters that a schema cannot say."""
    cfg = config.all()
    if "t" in cfg and cfg["t_prime"] < cfg["t"]:
        raise ValueError(f"config t_prime ({cfg['t_prime']}) must be >= t ({cfg['t']})")
    if "din_mlp" in cfg:
        mlp_widths(cfg["din_mlp"])
    if "update_scope" in cfg:
        from coda.training import SCOPES  # only coda_train declares it; the others need no MNN
        parts = cfg["update_scope"].split("+")
        if not all(p in SCOPES for p in parts):
            raise ValueError(f"config update_scope must be one or more of {list(SCOPES)} joined by '+', "
                             f"got {cfg['update_scope']!r}")
    return cfg


def mlp_widths(text):
    """"64,16" -> [64, 16]; "" -> None (keep the stored model's)."""
    if not text:
        return None
    try:
        widths = [int(p) for p in text.split(",")]
    except ValueError:
        widths = []
    if not 1 <= len(widths) <= 4 or not all(1 <= w <= 512 for w in widths):
        raise ValueError(f"config din_mlp must be 1-4 comma-separated integers in [1, 512] like '32,16', got {text!r}")
    return widths


def today_or_none():
    """KV "today" (written by the app)."""
    day = storage.get("today", None)
    if day is not None and (isinstance(day, bool) or not isinstance(day, int)):
        raise ValueError(f"KV 'today' must be an integer day, got {short(day)}")
    return day


def rows_of(table, where=None, order_by="ts"):
    """All matching rows, paged (a query returns at most 10,000)."""
    out = []
    offset = 0
    while True:
        page = storage.query(table, where=where, order_by=order_by, limit=PAGE, offset=offset)
        out.extend(page)
        if len(page) < PAGE:
            return out
        offset = offset + PAGE


KEY_COLUMNS = ("sample_id", "item_id", "label", "ts", "day") + LIST_COLUMNS
DECODED = {}  # row content -> sample, for this run only (each run is a fresh process)


def sample(row):
    """A stored row -> the sample dict the features take; a malformed row is an error naming it.
    A script reads some rows more than once (a check pass, then the work): each is decoded once."""
    key = tuple(row[c] if c in row else None for c in KEY_COLUMNS)
    try:
        if key in DECODED:
            return dict(DECODED[key])
    except TypeError:  # an unhashable value: not a stored row, decode it without the cache
        key = None
    sid = key[0] if key is not None else row.get("sample_id")
    if not isinstance(sid, str) or not sid:
        raise ValueError(f"a row has no sample_id (got {short(sid)})")
    s = {"sample_id": sid, "item_id": row.get("item_id") or 0, "label": row.get("label") or 0.0,
         "ts": row.get("ts"), "day": row.get("day")}
    for col in LIST_COLUMNS:
        text = row.get(col)
        value = []
        if text is not None:
            try:
                value = json.loads(text) if isinstance(text, str) else None
            except ValueError:
                value = None
        if not isinstance(value, list):
            raise ValueError(f"row {sid!r}: column {col!r} must hold a JSON list, got {str(text)[:80]!r}")
        s[col] = value
    for col in ("day", "ts"):
        if isinstance(s[col], bool) or not isinstance(s[col], int):
            raise ValueError(f"row {sid!r}: column {col!r} must be an integer, got {short(s[col])}")
    if key is not None:
        DECODED[key] = s
    return dict(s)


def delete_ids(table, ids, state=None):
    n = 0
    for start in range(0, len(ids), ID_CHUNK):
        where = {"sample_id": {"in": ids[start:start + ID_CHUNK]}}
        if state is not None:
            where["state"] = state
        n = n + storage.delete_rows(table, where)
    return n


def halve_until_below(table, max_rows, order_by):
    """Section 4.4.1's forced cleanup: delete the first half by `order_by` until < max_rows rows."""
    removed = 0
    n = storage.count(table)
    while n >= max_rows:
        doomed = storage.query(table, order_by=order_by, limit=n - n // 2)
        gone = delete_ids(table, sorted(set(r["sample_id"] for r in doomed)))
        if gone == 0:
            break
        removed = removed + gone
        n = storage.count(table)
    return removed


def stable_hash(text):
    """FNV-1a of the code points: the same split on every device and every run."""
    h = 2166136261
    for ch in text:
        h = ((h ^ ord(ch)) * 16777619) % 4294967296
    return h
