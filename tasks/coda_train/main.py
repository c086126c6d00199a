"""CoDA personalized model training: the paper's Algorithm 3, with the lifecycle rules of section
4.4.1 for the `local` table beside it.

Triggered when `outside` reaches 100 rows (`table_rows`) or when today's batches are exhausted
(`batches_exhausted`). With config `local_arm` (or KV "experiment.local_arm") true, the Local baseline "ctr_local" gets the
same update on local samples only. A missing model is created from the cloud's global model, and a
model whose M0 is an older global model than the newest published restarts from the newest."""
from walle import log, storage

from coda import din, features, gate, rows, stored

CTR_MODEL = "ctr"
LOCAL_MODEL = "ctr_local"
GLOBAL_RESOURCE = "coda/global_model"


def local_lifecycle(today, cfg):
    """4.4.1: local samples older than t' days expire; at the size limit the older half goes."""
    expired = storage.delete_rows("local", {"day": {"lt": today - cfg["t_prime"]}})
    return expired, rows.halve_until_below("local", cfg["max_rows"], "ts")


def skipped(reason, n_train=0, n_val=0):
    return {"committed": False, "before": None, "after": None, "metric": None, "n_train": n_train,
            "n_val": n_val, "version": None, "skipped": reason}


def train_arm(name, info, train, val, cfg):
    """Algorithm 3 on model `name` (`info`: its model.info): M_u trained on S_u^1 (+ kept outside
    samples), kept only if validation on S_u^2 improves. A hot-deployed architecture change migrates
    M_u and commits."""
    if not val:
        return skipped(f"no local samples of the last {cfg['t']} days to validate on", len(train))
    if len(val) < cfg["min_val"]:
        return skipped(f"{len(val)} validation samples, fewer than min_val={cfg['min_val']}", len(train), len(val))
    if not train:
        return skipped(f"no training samples (local samples of ({cfg['t']}, {cfg['t_prime']}] days or kept "
                       f"outside samples)", 0, len(val))
    shape = dict(stored.base_config(info))
    if rows.mlp_widths(cfg["din_mlp"]):
        shape["mlp"] = rows.mlp_widths(cfg["din_mlp"])
    update = stored.Update(name, din.DIN(shape, cfg["seed"]), "din")
    val_data = features.batch(val, update.net.config["hist_len"], update.net.config["profile_dim"])
    train_data = features.batch(train, update.net.config["hist_len"], update.net.config["profile_dim"])
    res = gate.train_update(update.net, train_data, val_data, cfg, gate.own_items(val))
    metric = res["metric"]
    if res["improved"] or update.migrated:
        version = update.commit({"metric": metric, "val_before": res["before"], "val_after": res["after"],
                                 "n_train": len(train), "n_val": len(val), "migrated": update.fresh,
                                 "base_resource": stored.base_resource(info)})
    else:
        version = update.discard()
    return {"committed": res["improved"] or update.migrated, "before": res["before"], "after": res["after"],
            "metric": metric, "n_train": len(train), "n_val": len(val), "version": version,
            "migrated": update.fresh}


def main(event):
    if not isinstance(event, dict):
        raise ValueError(f"event must be an object, got {features.short(event)}")
    cfg = rows.settings()
    local_arm = storage.get("experiment.local_arm", False)
    if not isinstance(local_arm, bool):
        raise ValueError(f"KV 'experiment.local_arm' must be true or false, got {features.short(local_arm)}")
    local_arm = local_arm or cfg.get("local_arm", False)  # the release's config (the demo's) or the app's KV
    arms = [CTR_MODEL, LOCAL_MODEL] if local_arm else [CTR_MODEL]
    # 5.2 (4): M_u starts from the cloud's model, and again from each newer one the cloud publishes
    # (the cloud retrains it every day on everyone's behaviour); the day's update applies on top.
    models = {name: stored.follow_resource(name, GLOBAL_RESOURCE) for name in arms}
    restarted = [name for name in arms if models[name][1]]
    if restarted:
        log.info(f"restarted {restarted} from the newest {GLOBAL_RESOURCE}")
    tables = storage.tables()
    today = rows.today_or_none()
    if today is None and "local" in tables:
        newest = storage.query("local", order_by="-day", limit=1)
        today = newest[0]["day"] if newest else None
    if today is None or "local" not in tables:  # a new user: matched batches before any own behaviour
        return {name: skipped("no local samples to validate on") for name in arms}
    for r in rows.rows_of("local"):
        rows.sample(r)  # check before writing anything
    kept = [rows.sample(r) for r in rows.rows_of("outside", {"state": "kept"}, "-score")] if "outside" in tables else []

    expired, cleaned = local_lifecycle(today, cfg)
    log.info(f"local lifecycle: {expired} expired, {cleaned} removed by the size limit")
    if event.get("name") == "table_rows" and len(kept) < cfg["train_at"]:
        return {name: skipped(f"{len(kept)} kept outside samples, fewer than train_at={cfg['train_at']}")
                for name in arms}

    # Algorithm 3 line 1 with 4.4.1's windows: S_u^2 = the last t days validate, S_u^1 = (t, t'] trains.
    newest_first = rows.rows_of("local", {"day": {"ge": today - cfg["t_prime"]}}, "-ts")
    val = [rows.sample(r) for r in newest_first if r["day"] >= today - cfg["t"]][:cfg["max_per_run"]]
    train_local = [rows.sample(r) for r in newest_first if r["day"] < today - cfg["t"]][:cfg["max_per_run"]]
    used_kept = kept[:max(0, cfg["max_per_run"] - len(train_local))]  # the highest-scored first

    out = {CTR_MODEL: train_arm(CTR_MODEL, models[CTR_MODEL][0], train_local + used_kept, val, cfg)}
    if "skipped" not in out[CTR_MODEL] and used_kept:
        rows.delete_ids("outside", [s["sample_id"] for s in used_kept], "kept")  # 4.4.1: used, removed
    if local_arm:
        out[LOCAL_MODEL] = train_arm(LOCAL_MODEL, models[LOCAL_MODEL][0], train_local, val, cfg)
    for name in arms:
        out[name]["restarted"] = models[name][1]
        out[name]["base_resource"] = stored.base_resource(models[name][0])
    log.info(f"train: {out}")
    return out
