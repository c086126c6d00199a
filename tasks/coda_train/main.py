"""CoDA personalized model training (paper Algorithm 3, lifecycle rules of section 4.4.1).

Triggered when table `outside` reaches 100 rows (`table_rows`) or when today's batches are exhausted
(`batches_exhausted`). Steps:
  1. local lifecycle: delete local rows older than T_PRIME days; if `local` still holds >= MAX_ROWS
     rows, delete the older half (by ts) until it holds fewer;
  2. a `table_rows` run trains only once TRAIN_AT kept samples are there (the trigger also counts
     rows still waiting for the filter);
  3. validation = local samples of the last T days, training = local samples of (T, T_PRIME] days
     plus the kept outside samples; "ctr" starts from its current M, and `model.commit_if_better`
     commits the update only if the validation metric improves (auc when the validation set has
     both classes, else logloss);
  4. the kept outside samples used are deleted, whether or not the update was committed;
  5. with KV "experiment.local_arm" true, the Local baseline "ctr_local" gets the same, on local
     samples only.
If "ctr" (or "ctr_local") does not exist it is created from the cloud's global model fetched with
`tunnel.down`; when that is unavailable the run fails with an error saying so.
"""
import json

from walle import HostAPIError, log, model, storage, tunnel

DEFAULTS = {"SIGMA": 0.2, "T": 3, "T_PRIME": 7, "MAX_ROWS": 200, "TRAIN_AT": 100, "lr": 0.005, "epochs": 1,
            "seed": 7, "clf_lr": 0.01, "clf_epochs": 5}
CTR_MODEL = "ctr"
LOCAL_MODEL = "ctr_local"
GLOBAL_RESOURCE = "coda/global_model"
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


def current_day():
    """KV "today" (written by the app); without it, the newest local day."""
    day = storage.get("today", None)
    if day is None:
        newest = storage.query("local", order_by="-day", limit=1)
        return newest[0]["day"] if newest else None
    if isinstance(day, bool) or not isinstance(day, int):
        raise ValueError(f"KV 'today' must be an integer day, got {short(day)}")
    return day


def local_lifecycle(today, cfg):
    """Samples older than T_PRIME days expire; above the size limit the older half goes."""
    expired = storage.delete_rows("local", {"day": {"lt": today - cfg["T_PRIME"]}})
    cleaned = 0
    n = storage.count("local")
    while n >= cfg["MAX_ROWS"]:
        doomed = storage.query("local", order_by="ts", limit=n - n // 2)
        gone = delete_ids("local", sorted(set(r["sample_id"] for r in doomed)))
        if gone == 0:
            break
        cleaned = cleaned + gone
        n = storage.count("local")
    return expired, cleaned


def ensure_model(name):
    """The model's info; a missing model is created from the cloud's global model via the tunnel."""
    try:
        return model.info(name=name)
    except HostAPIError as e:
        if e.kind != "NotFound":
            raise
    try:
        res = tunnel.down(GLOBAL_RESOURCE, format="base64")
    except HostAPIError as e:
        raise RuntimeError(f"model {name!r} does not exist on this device and the global model "
                           f"{GLOBAL_RESOURCE!r} could not be fetched through the tunnel ({e}); "
                           f"the host must create {name!r} first") from None
    log.info(f"creating {name!r} from {GLOBAL_RESOURCE} version {res.get('version')}")
    return model.create(name=name, arch="din", params_b64=res["data"], exist_ok=True)


def skipped(reason, n_train, n_val):
    return {"committed": False, "before": None, "after": None, "metric": None, "n_train": n_train,
            "n_val": n_val, "version": None, "skipped": reason}


def train_arm(name, train, val, cfg):
    """One gated update of `name` (Algorithm 3 lines 2-10 run inside model.commit_if_better)."""
    if not val:
        return skipped(f"no local samples of the last {cfg['T']} days to validate on", len(train), 0)
    if not train:
        return skipped(f"no training samples (local samples of ({cfg['T']}, {cfg['T_PRIME']}] days "
                       f"or kept outside samples)", 0, len(val))
    ensure_model(name)
    labels = set(1 if s["label"] >= 0.5 else 0 for s in val)
    metric = "auc" if len(labels) == 2 else "logloss"
    res = model.commit_if_better(name=name, train_samples=train, val_samples=val, epochs=cfg["epochs"],
                                 lr=cfg["lr"], seed=cfg["seed"], metric=metric)
    return {"committed": res["committed"], "before": res["before"], "after": res["after"], "metric": metric,
            "n_train": len(train), "n_val": len(val), "version": res["version"]}


def main(event):
    if not isinstance(event, dict):
        raise ValueError(f"event must be an object, got {short(event)}")
    cfg = load_config()
    local_arm = storage.get("experiment.local_arm", False)
    if not isinstance(local_arm, bool):
        raise ValueError(f"KV 'experiment.local_arm' must be true or false, got {short(local_arm)}")
    arms = [CTR_MODEL, LOCAL_MODEL] if local_arm else [CTR_MODEL]
    tables = storage.tables()
    if "local" not in tables:
        return {name: skipped("no table 'local' yet: no local samples to validate on", 0, 0) for name in arms}
    today = current_day()
    if today is None:
        return {name: skipped("table 'local' is empty: no local samples to validate on", 0, 0) for name in arms}

    # Read and check everything before the first write.
    for r in rows_of("local"):
        to_sample(r)
    kept_rows = rows_of("outside", {"state": "kept"}, "-score") if "outside" in tables else []
    kept = [to_sample(r) for r in kept_rows]

    expired, cleaned = local_lifecycle(today, cfg)
    log.info(f"local lifecycle: {expired} expired, {cleaned} removed by the size limit")
    if event.get("name") == "table_rows" and len(kept) < cfg["TRAIN_AT"]:
        reason = f"{len(kept)} kept outside samples, fewer than TRAIN_AT={cfg['TRAIN_AT']}"
        return {name: skipped(reason, 0, 0) for name in arms}

    newest_first = rows_of("local", {"day": {"ge": today - cfg["T_PRIME"]}}, "-ts")
    val = [to_sample(r) for r in newest_first if r["day"] >= today - cfg["T"]][:MAX_PER_CALL]
    train_local = [to_sample(r) for r in newest_first if r["day"] < today - cfg["T"]][:MAX_PER_CALL]
    used_kept = kept[:max(0, MAX_PER_CALL - len(train_local))]  # the highest-scored first

    out = {CTR_MODEL: train_arm(CTR_MODEL, train_local + used_kept, val, cfg)}
    if "skipped" not in out[CTR_MODEL] and used_kept:
        delete_ids("outside", [s["sample_id"] for s in used_kept], "kept")
    if local_arm:
        out[LOCAL_MODEL] = train_arm(LOCAL_MODEL, train_local, val, cfg)
    log.info(f"train: {out}")
    return out
