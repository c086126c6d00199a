"""CoDA: pull the matched samples of the newest prepared day (paper 4.2.1 sample query, 5.2).

Calls `tunnel.pull("samples", "outside", ...)`: the host pulls the next batches this device has not
pulled yet (resumable), at most what fits below MAX_ROWS rows of `outside` and within the cloud's
12-a-day limit, stores one row per sample (the FIELDS below, list fields as JSON text, plus batch_id)
with state "new" and no score yet, and fires `batch_received` (coda_filter runs). Then:
  - KV `today` := the cloud's work-cycle day (coda_samples stamps new local samples with it and the
    local lifecycle counts days by it);
  - when nothing more can be pulled today, emits `batches_exhausted` once per day, so coda_train
    finishes the day's training (paper 5.2).
Returns the pull's summary.
"""
from walle import config, events, log, storage, tunnel

# What the filter and the trainer read of a matched sample (the other user's pseudonym is not kept).
FIELDS = ["sample_id", "day", "ts", "label", "item_id", "item_cats", "hist_items", "hist_cats", "profile"]
NEW = {"state": "new", "score": None}

def max_rows():
    cfg = storage.get("config", None) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"KV 'config' must be an object, got {cfg!r}")
    # the app's KV setting, else the release's config (`release create --set max_rows=N`)
    value = cfg.get("MAX_ROWS", config.get("max_rows"))
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"config MAX_ROWS must be an integer >= 2, got {value!r}")
    return value


def main(event):
    res = tunnel.pull(service="samples", table="outside", max_rows=max_rows(), event="batch_received",
                      fields=FIELDS, columns=NEW)
    if res["today"]:
        storage.put("today", res["today"])
    if res["pulled"]:
        log.info(f"pulled {res['pulled']} batches ({res['rows']} samples, {res['bytes']} bytes) of day {res['day']}")
    if res["exhausted"] and res["day"] and storage.get("exhausted_day", 0) != res["day"]:
        storage.put("exhausted_day", res["day"])
        events.emit("batches_exhausted", {"day": res["day"], "reason": res["reason"]})
    return res
