"""CoDA on-device sample filtering: the paper's Algorithm 2, with the lifecycle rules of section
4.4.1 for the `outside` table beside it.

Triggered by `batch_received` after the app stored a batch of matched samples in `outside` with
state "new". Everything is read and checked before the first write, so bad config or a malformed
row changes nothing. Storage has no update op: a kept row is re-inserted as "kept" before its "new"
copy is deleted, and a "new" row whose sample_id is already kept is a duplicate, so a crash between
the two writes is repaired by the next run. See docs/coda-tasks.md."""
from walle import log, storage

from coda import classifier, features, rows, stored, training

CLASSIFIER = "clf"
CTR_MODEL = "ctr"  # its config names the catalogue (vocabularies, history length)
GLOBAL_RESOURCE = "coda/global_model"


def new_batches():
    """New rows, without duplicates of rows already kept, in a stable pseudo-random order."""
    kept = set(r["sample_id"] for r in rows.rows_of("outside", {"state": "kept"}))
    new, seen, dups = [], set(), []
    for r in rows.rows_of("outside", {"state": "new"}):
        if r["sample_id"] in kept:
            dups.append(r["sample_id"])
        elif r["sample_id"] not in seen:
            seen.add(r["sample_id"])
            new.append(r)
    n_dups = rows.delete_ids("outside", sorted(set(dups)), "new") if dups else 0
    return sorted(new, key=lambda r: (rows.stable_hash(r["sample_id"]), r["sample_id"])), n_dups


def classifier_net(cfg, seed):
    catalogue = stored.base_config(stored.ensure_from_resource(CTR_MODEL, GLOBAL_RESOURCE))
    return classifier.Classifier({"n_items": catalogue["n_items"], "n_cats": catalogue["n_cats"],
                                  "hist_len": catalogue["hist_len"], "dim": cfg["clf_dim"],
                                  "hidden": cfg["clf_hidden"]}, seed)


def main(event):
    if not isinstance(event, dict):
        raise ValueError(f"event must be an object, got {features.short(event)}")
    cfg = rows.settings()
    today = rows.today_or_none()
    counts = {"received": 0, "trained_on": 0, "scored": 0, "kept": 0, "dropped": 0, "duplicates": 0,
              "cleaned": 0}
    tables = storage.tables()
    if "outside" not in tables:
        log.info("no table 'outside' yet: nothing to filter")
        return counts
    for r in rows.rows_of("outside", {"state": "new"}):
        rows.sample(r)  # check before writing anything
    # Local samples of the last t' days are S_u (older ones are expired by coda_train).
    local_where = None if today is None else {"day": {"ge": today - cfg["t_prime"]}}
    local = [rows.sample(r) for r in rows.rows_of("local", local_where, "-ts")] if "local" in tables else []

    # 4.4.1 forced cleanup: at the size limit the lower-scored half goes (unscored = 0, so first).
    counts["cleaned"] = rows.halve_until_below("outside", cfg["max_rows"], "score")
    new, counts["duplicates"] = new_batches()
    counts["received"] = len(new)
    if not new:
        return counts
    if not local:
        counts["skipped"] = "no local samples to train the classifier on; the new rows wait for the next batch"
        log.warning(counts["skipped"])
        return counts

    # Algorithm 2 line 1: divide the matched samples, 1/3 to train the classifier, 2/3 to filter.
    n_clf = (len(new) + 1) // 3
    clf_part, score_part = new[:n_clf], new[n_clf:]
    outside = [rows.sample(r) for r in clf_part]
    local = local[:max(0, cfg["max_per_run"] - len(outside))]  # the most recent local samples

    # Lines 2-5: C_u (randomly initialised once) trained on local = 1 and outside = 0.
    net = classifier_net(cfg, cfg["seed"])
    update = stored.Update(CLASSIFIER, net, "classifier") if stored.info_or_none(CLASSIFIER) else None
    data = features.batch(local + outside, net.config["hist_len"])
    data = data.with_labels([1.0] * len(local) + [0.0] * len(outside))
    training.train(net, data, cfg["clf_epochs"], cfg["clf_lr"], cfg["seed"])
    if update is None:
        stored.create(CLASSIFIER, net, "classifier", {"n_train": data.n})
    else:
        update.commit({"n_train": data.n, "migrated": update.fresh})
    counts["trained_on"] = len(outside)
    rows.delete_ids("outside", [r["sample_id"] for r in clf_part], "new")  # 4.4.1: used, removed

    # Lines 6-11: keep the samples the classifier scores >= sigma (4.4.1: the rest are abandoned).
    if score_part:
        probs = training.predict(net, features.batch([rows.sample(r) for r in score_part], net.config["hist_len"]))
        keep = []
        for r, p in zip(score_part, probs.tolist()):
            if p >= cfg["sigma"]:
                row = dict(r)
                row["state"], row["score"] = "kept", float(p)
                keep.append(row)
        if keep:
            storage.insert("outside", keep)
        rows.delete_ids("outside", [r["sample_id"] for r in score_part], "new")
        counts["scored"], counts["kept"] = len(score_part), len(keep)
        counts["dropped"] = len(score_part) - len(keep)
    log.info(f"filter: {counts}")
    return counts
