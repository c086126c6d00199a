"""CoDA on-device sample filtering (paper Algorithm 2, lifecycle rules of section 4.4.1).

Triggered by `batch_received` after the host stored a batch of matched samples in table `outside`
with state "new". Steps:
  1. forced cleanup: while `outside` holds >= MAX_ROWS rows, delete the lower-scored half
     (unscored rows count as 0, so they go first; ties go oldest row first);
  2. split the new rows 1/3 : 2/3 by a stable hash of sample_id (FNV-1a of its code points);
  3. create the sample classifier "clf" if missing (random init from `seed`) and train it on the
     local samples of the last T_PRIME days (label 1) and the 1/3 (label 0);
  4. delete the 1/3 (used), score the 2/3: score >= SIGMA -> state "kept" with its score, else deleted.
Everything is read and checked before the first write, so bad config or a malformed row changes
nothing. Storage has no update op: a kept row is re-inserted as "kept" before its "new" copy is
deleted, and a "new" row whose sample_id is already kept is dropped as a duplicate, so a crash
between the two writes is repaired by the next run. See docs/coda-tasks.md.
"""
import json

from walle import HostAPIError, log, model, storage

DEFAULTS = {"SIGMA": 0.2, "T": 3, "T_PRIME": 7, "MAX_ROWS": 200, "TRAIN_AT": 100, "lr": 0.005, "epochs": 1,
            "seed": 7, "clf_lr": 0.01, "clf_epochs": 5}
CLASSIFIER = "clf"
CTR_MODEL = "ctr"
LIST_COLUMNS = ("item_cats", "hist_items", "hist_cats", "profile")
PAGE = 1000
MAX_PER_CALL = 2000  # the model ops take at most 2,000 samples per call
ID_CHUNK = 500


def short(value):
    """A value for an error message, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_number(cfg, key, lo, hi, integer):
    v = cfg[key]
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"config {key} must be {kind} in [{lo}, {hi}], got {short(v)}")


def load_config():
    """DEFAULTS overridden by the KV "config" (the demo scales t / t' to its simulated days)."""
    raw = storage.get("config", None)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"KV 'config' must be an object of overrides, got {short(raw)}")
    unknown = sorted(k for k in raw if k not in DEFAULTS)
    if unknown:
        raise ValueError(f"KV 'config' has unknown keys {unknown}; allowed: {sorted(DEFAULTS)}")
    cfg = dict(DEFAULTS)
    cfg.update(raw)
    check_number(cfg, "SIGMA", 0, 1, False)
    check_number(cfg, "T", 0, 10000, True)
    check_number(cfg, "T_PRIME", cfg["T"], 10000, True)
    check_number(cfg, "MAX_ROWS", 2, 5000, True)
    check_number(cfg, "TRAIN_AT", 1, 100000, True)
    check_number(cfg, "lr", 1e-9, 1, False)
    check_number(cfg, "clf_lr", 1e-9, 1, False)
    check_number(cfg, "epochs", 1, 20, True)
    check_number(cfg, "clf_epochs", 1, 20, True)
    check_number(cfg, "seed", 0, 2147483647, True)
    return cfg


def today_or_none():
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


def to_sample(row):
    """A stored row -> the sample dict the model ops take (list columns are JSON text)."""
    sid = row.get("sample_id")
    if not isinstance(sid, str) or not sid:
        raise ValueError(f"a row has no sample_id (got {short(sid)})")
    s = {"sample_id": sid, "item_id": row.get("item_id"), "label": row.get("label"), "ts": row.get("ts"),
         "day": row.get("day")}
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
        v = s[col]
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"row {sid!r}: column {col!r} must be an integer, got {short(v)}")
    if s["item_id"] is None:
        s["item_id"] = 0
    if s["label"] is None:
        s["label"] = 0.0
    return s


def delete_ids(table, ids, state=None):
    n = 0
    for start in range(0, len(ids), ID_CHUNK):
        where = {"sample_id": {"in": ids[start:start + ID_CHUNK]}}
        if state is not None:
            where["state"] = state
        n = n + storage.delete_rows(table, where)
    return n


def stable_hash(text):
    h = 2166136261
    for ch in text:
        h = ((h ^ ord(ch)) * 16777619) % 4294967296
    return h


def forced_cleanup(max_rows):
    """Halve `outside` lowest score first (NULL sorts first = unscored counts as 0) until < max_rows."""
    removed = 0
    n = storage.count("outside")
    if n < max_rows:
        return 0
    # A table written without a score column holds only unscored rows: then oldest first.
    order = "score" if "score" in storage.query("outside", limit=1)[0] else "ts"
    while n >= max_rows:
        doomed = storage.query("outside", order_by=order, limit=n - n // 2)
        ids = sorted(set(r["sample_id"] for r in doomed))
        gone = delete_ids("outside", ids)
        if gone == 0:
            break
        removed = removed + gone
        n = storage.count("outside")
    return removed


def classifier_config():
    """Match the CTR model's vocabulary and history length, so the classifier accepts its samples."""
    try:
        cfg = model.info(name=CTR_MODEL)["config"]
    except HostAPIError:
        return None
    return {k: cfg[k] for k in ("n_items", "n_cats", "hist_len") if k in cfg}


def score_all(samples):
    probs = []
    for start in range(0, len(samples), MAX_PER_CALL):
        probs.extend(model.predict(name=CLASSIFIER, samples=samples[start:start + MAX_PER_CALL])["probs"])
    return probs


def main(event):
    if not isinstance(event, dict):
        raise ValueError(f"event must be an object, got {short(event)}")
    cfg = load_config()
    today = today_or_none()
    counts = {"received": 0, "trained_on": 0, "scored": 0, "kept": 0, "dropped": 0, "duplicates": 0,
              "cleaned": 0}
    tables = storage.tables()
    if "outside" not in tables:
        log.info("no table 'outside' yet: nothing to filter")
        return counts

    # Read and check everything before the first write.
    for r in rows_of("outside", {"state": "new"}):
        to_sample(r)
    local_where = None if today is None else {"day": {"ge": today - cfg["T_PRIME"]}}
    local_rows = rows_of("local", local_where, "-ts") if "local" in tables else []
    local = [to_sample(r) for r in local_rows]

    counts["cleaned"] = forced_cleanup(cfg["MAX_ROWS"])
    kept_ids = set(r["sample_id"] for r in rows_of("outside", {"state": "kept"}))
    new = []
    seen = set()
    dup_ids = []
    for r in rows_of("outside", {"state": "new"}):
        sid = r["sample_id"]
        if sid in kept_ids:
            dup_ids.append(sid)
        elif sid not in seen:
            seen.add(sid)
            new.append(r)
    if dup_ids:
        counts["duplicates"] = delete_ids("outside", sorted(set(dup_ids)), "new")
    counts["received"] = len(new)
    if not new:
        return counts
    if not local:
        counts["skipped"] = "no local samples to train the classifier on; the new rows wait for the next batch"
        log.warning(counts["skipped"])
        return counts

    new = sorted(new, key=lambda r: (stable_hash(r["sample_id"]), r["sample_id"]))
    n_clf = (len(new) + 1) // 3
    clf_part, score_part = new[:n_clf], new[n_clf:]
    negatives = [to_sample(r) for r in clf_part]
    positives = local[:max(0, MAX_PER_CALL - len(negatives))]  # the most recent local samples

    model.create(name=CLASSIFIER, arch="classifier", config=classifier_config(), seed=cfg["seed"], exist_ok=True)
    if negatives or positives:
        labels = [1.0 for s in positives] + [0.0 for s in negatives]
        model.train(name=CLASSIFIER, samples=positives + negatives, labels=labels, epochs=cfg["clf_epochs"],
                    lr=cfg["clf_lr"], seed=cfg["seed"])
    counts["trained_on"] = len(negatives)
    delete_ids("outside", [r["sample_id"] for r in clf_part], "new")

    if score_part:
        probs = score_all([to_sample(r) for r in score_part])
        keep = []
        for r, p in zip(score_part, probs):
            if p >= cfg["SIGMA"]:
                row = dict(r)
                row["state"] = "kept"
                row["score"] = float(p)
                keep.append(row)
        if keep:
            storage.insert("outside", keep)
        delete_ids("outside", [r["sample_id"] for r in score_part], "new")
        counts["scored"] = len(score_part)
        counts["kept"] = len(keep)
        counts["dropped"] = len(score_part) - len(keep)
    log.info(f"filter: {counts}")
    return counts
