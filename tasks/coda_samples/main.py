"""CoDA: the user's local samples, born on the device from the app's own behaviour (paper 3.1, 4.4.1).

Reads the app event log (`events.read`) from its cursor, so no event is lost when queued runs coalesce.
Behaviour events (payloads):
  exposure  {"items": [item_id, ...]}         items shown to the user (one behaviour each)
  click     {"item_id": n}                    a click
  view      {"item_id": n}                    a page view of an item
  rate      {"item_id": n, "value": 1..5}     a rating (>= 4 counts as a click)
  all take optional "ts" (unix seconds; default: when the app emitted it) and "day" (default: KV today)
  profile   {"values": [float, ...]}          the user's profile features (KV "profile")
Each behaviour is one row of table `behavior` (numbered n = 0, 1, ...) and, once the user has at least
MIN_HIST earlier behaviours, one CTR sample in table `local`, built as the cloud builds samples
(platform/coda/samples.py): label 1 for a click or a rating >= 4; history = the last HIST_LEN items with a
strictly earlier time; categories from the catalog resource `coda/catalog`. Nothing comes from the cloud
but the catalog (what items are): the samples are this user's own.

Local lifecycle (paper 4.4.1, KV "config": T_PRIME, MAX_ROWS): rows of days before today - T_PRIME are
deleted; when `local` reaches MAX_ROWS rows the older half (by ts) is deleted.

Up tunnel: behaviour not sent yet is uploaded as one `behavior.batch` record (the host compresses it)
when UPLOAD_AT rows are pending, on `flush_behavior` and on the schedule.
"""
import json

from walle import HostAPIError, events, log, storage, tunnel

DEFAULTS = {"T_PRIME": 7, "MAX_ROWS": 200}           # shared with coda_filter/coda_train (KV "config")
OWN = {"UPLOAD_AT": 50, "HIST_LEN": 50, "MIN_HIST": 5, "KEEP_BEHAVIOR": 1000}  # KV "samples.config"
BEHAVIOR = ("exposure", "click", "view", "rate")
READ = list(BEHAVIOR) + ["profile", "flush_behavior"]
CLICK_THRESHOLD = 4.0
PAGE = 1000


def short(value):
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def config():
    shared = storage.get("config", None) or {}
    own = storage.get("samples.config", None) or {}
    if not isinstance(shared, dict) or not isinstance(own, dict):
        raise ValueError("KV 'config' and 'samples.config' must be objects")
    unknown = sorted(k for k in own if k not in OWN)
    if unknown:
        raise ValueError(f"KV 'samples.config' has unknown keys {unknown}; allowed: {sorted(OWN)}")
    cfg = dict(DEFAULTS)
    cfg.update({k: shared[k] for k in DEFAULTS if k in shared})
    cfg.update(OWN)
    cfg.update(own)
    for key, lo in (("T_PRIME", 0), ("MAX_ROWS", 2), ("UPLOAD_AT", 1), ("HIST_LEN", 1), ("MIN_HIST", 0),
                    ("KEEP_BEHAVIOR", 1)):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"config {key} must be an integer >= {lo}, got {short(v)}")
    return cfg


def catalog():
    """item_id -> category ids, from the catalog resource (cached by the host's down tunnel)."""
    try:
        res = tunnel.down(name="coda/catalog", format="json")
    except HostAPIError as e:
        if "NOT_FOUND" in str(e):
            return {}, ""
        raise
    return {int(i): cats for i, cats in res["data"]["items"]}, res["version"]


def number(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {short(value)}")
    return value


def behaviours(ev, today):
    """(ts, item_id, event, value, day) of one logged event; ValueError names a bad field."""
    p = ev["payload"]
    name = ev["name"]
    where = f"event #{ev['seq']} {name}"
    if not isinstance(p, dict):
        raise ValueError(f"{where}: payload must be an object, got {short(p)}")
    ts = int(number(p.get("ts", ev["ts_ms"] // 1000), f"{where}: ts"))
    day = p.get("day", today)
    if isinstance(day, bool) or not isinstance(day, int) or day < 0:
        raise ValueError(f"{where}: day must be an integer >= 0, got {short(day)}")
    if name == "exposure":
        items = p.get("items")
        if not isinstance(items, list):
            raise ValueError(f"{where}: payload.items must be a list of item ids, got {short(items)}")
    else:
        items = [p.get("item_id")]
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item <= 0:
            raise ValueError(f"{where}: item ids must be integers > 0, got {short(item)}")
        value = float(number(p.get("value", 1.0 if name == "click" else 0.0), f"{where}: value"))
        out.append((ts, item, name, value, day))
    return out


def count_before(times, ts):
    """How many of the sorted `times` are strictly smaller than ts (binary search)."""
    lo, hi = 0, len(times)
    while lo < hi:
        mid = (lo + hi) // 2
        if times[mid] < ts:
            lo = mid + 1
        else:
            hi = mid
    return lo


def label(event, value):
    return 1.0 if event == "click" or (event == "rate" and value >= CLICK_THRESHOLD) else 0.0


def recent_behaviour(keep):
    if "behavior" not in storage.tables():
        return []
    return storage.query("behavior", order_by="-n", limit=keep)[::-1]


def lifecycle(cfg, today):
    """Paper 4.4.1, local samples: older than t' days go; at the size limit the older half goes."""
    removed = 0
    if "local" not in storage.tables():
        return 0
    if today is not None:
        removed += storage.delete_rows("local", {"day": {"lt": today - cfg["T_PRIME"]}})
    n = storage.count("local")
    if n >= cfg["MAX_ROWS"]:
        drop = n - n // 2
        old = storage.query("local", order_by="ts", limit=drop)
        ids = [r["sample_id"] for r in old]
        for i in range(0, len(ids), 500):
            removed += storage.delete_rows("local", {"sample_id": {"in": ids[i:i + 500]}})
    return removed


def upload(cfg, force):
    """Send behaviour rows not uploaded yet as one aggregated record (contiguous numbers)."""
    sent_through = storage.get("behavior.uploaded", -1)
    if "behavior" not in storage.tables():
        return 0
    pending = storage.count("behavior", {"n": {"gt": sent_through}})
    if pending == 0 or (pending < cfg["UPLOAD_AT"] and not force):
        return 0
    rows = storage.query("behavior", where={"n": {"gt": sent_through}}, order_by="n", limit=pending)
    logs = [{"ts": r["ts"], "item_id": r["item_id"], "event": r["event"], "value": r["value"]} for r in rows]
    tunnel.up(topic="behavior.batch", data={"first_seq": rows[0]["n"], "logs": logs})
    storage.put("behavior.uploaded", rows[-1]["n"])
    return len(rows)


def main(event):
    cfg = config()
    today = storage.get("today", None)
    if today is not None and (isinstance(today, bool) or not isinstance(today, int)):
        raise ValueError(f"KV 'today' must be an integer day, got {short(today)}")
    cursor = storage.get("events.cursor", 0)
    got = events.read(after=cursor, names=READ, limit=PAGE)
    # read and check everything before the first write
    new = []
    skipped = 0
    profile = storage.get("profile", None)
    flush = event.get("name") in ("flush_behavior", "schedule", None)
    for ev in got:
        if ev["name"] == "profile":
            values = ev["payload"].get("values") if isinstance(ev["payload"], dict) else None
            if not isinstance(values, list) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
                raise ValueError(f"event #{ev['seq']} profile: payload.values must be a list of numbers")
            profile = [float(v) for v in values]
        elif ev["name"] == "flush_behavior":
            flush = True
        else:
            try:
                new.extend(behaviours(ev, today if today is not None else 1))
            except ValueError as e:  # one bad event must not block the log for good
                log.warning(f"skipped: {e}")
                skipped += 1
    cats, version = catalog() if new else ({}, "")
    profile = profile or []

    history = recent_behaviour(cfg["KEEP_BEHAVIOR"])
    next_n = (history[-1]["n"] + 1) if history else 0
    rows, samples = [], []
    timeline = [(r["ts"], r["n"], r["item_id"]) for r in history]
    for ts, item, name, value, day in new:
        n = next_n + len(rows)
        rows.append({"n": n, "ts": ts, "item_id": item, "event": name, "value": value, "day": day})
        timeline.append((ts, n, item))
    if rows:
        timeline.sort()
        times = [t for t, _, _ in timeline]
        for r in rows:
            earlier = count_before(times, r["ts"])
            if earlier < cfg["MIN_HIST"]:
                continue
            hist = [it for _, _, it in timeline[max(0, earlier - cfg["HIST_LEN"]):earlier]]
            samples.append({"sample_id": f"l{r['n']}", "day": r["day"], "ts": r["ts"],
                            "label": label(r["event"], r["value"]), "item_id": r["item_id"],
                            "item_cats": json.dumps(cats.get(r["item_id"], []), separators=(",", ":")),
                            "hist_items": json.dumps(hist, separators=(",", ":")),
                            "hist_cats": json.dumps([(cats.get(it) or [0])[0] for it in hist],
                                                    separators=(",", ":")),
                            "profile": json.dumps(profile, separators=(",", ":"))})
        # writes: behaviour first (the log of record), samples, then the cursor
        storage.insert("behavior", rows)
        if samples:
            storage.insert("local", samples)
    if got:
        storage.put("events.cursor", got[-1]["seq"])
    if storage.get("profile", None) != profile and profile:
        storage.put("profile", profile)
    removed = lifecycle(cfg, today)
    sent = upload(cfg, flush)
    if "behavior" in storage.tables() and next_n + len(rows) > cfg["KEEP_BEHAVIOR"]:
        storage.delete_rows("behavior", {"n": {"lt": min(next_n + len(rows) - cfg["KEEP_BEHAVIOR"],
                                                          storage.get("behavior.uploaded", -1) + 1)}})
    if len(got) == PAGE:
        events.emit("flush_behavior", {})  # more events wait in the log: run again
    return {"events": len(got), "skipped": skipped, "behaviours": len(rows), "samples": len(samples), "removed": removed,
            "uploaded": sent, "catalog": version}
