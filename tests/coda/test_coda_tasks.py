"""The three CoDA task scripts (tasks/coda_filter, coda_train, coda_infer) and their library
(tasks/_lib/coda) run through the REAL sandbox, with the real HostAPI over a SQLite TaskStorage, a
real ModelStore and its model ops, on samples generated from real MovieLens-100k users (one user is
the device's owner, the others are "outside"). The models train inside the sandboxed child; the test
checks their results with the same library files imported as the cloud imports them.

Each task folder is validated with the platform's manifest checks and run from the validated files,
with the manifest's limits and only the host APIs its manifest grants."""
from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest

from walle.device_host.hostapi import HostAPI
from walle.device_host.models.ops import make_model_ops
from walle.device_host.models.store import ModelStore
from walle.device_host.sandbox import Limits, Sandbox
from walle.device_host.storage import TaskStorage
from walle.platform.coda import movielens
from walle.platform.coda import samples as gen
from walle.device_host.sample_client import item_row
from walle.platform.coda.global_model import catalog_config, sample_dict, train_global
from walle.platform.coda.tasklib import coda_module
from walle.platform import taskconfig
from walle.platform.manifest import validate_task_dir
from walle.protos import coda_pb2

TASKS = pathlib.Path(__file__).resolve().parents[2] / "tasks"
NS = "coda"
USERS = (13, 450, 276, 416)  # heavy MovieLens raters: ~400-650 samples each
N_DAYS = 10
TODAY = 10
din, classifier, features, training = (coda_module(m) for m in ("din", "classifier", "features", "training"))


def fetch_fields() -> list[str]:
    """The Sample fields coda_fetch asks `tunnel.pull` to store (its FIELDS), read from the task itself."""
    tree = ast.parse((TASKS / "coda_fetch" / "main.py").read_text())
    return next(ast.literal_eval(n.value) for n in tree.body
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "FIELDS")


FETCH_FIELDS = fetch_fields()


def sample_to_row(sample, **columns) -> dict:
    """A row as the host's generic pull writes it for coda_fetch (local rows have the same columns)."""
    return item_row(sample, FETCH_FIELDS, columns)


# --- fixtures -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data() -> dict:
    """Real samples: the owner's (local) and the other users' (outside), each in time order."""
    ml = movielens.load()
    train, _test = movielens.assign_days(ml.inter[ml.inter["user_id"].isin(USERS)], N_DAYS)
    day = gen.generate(movielens.as_raw_frame(train), ml.items, None, key=b"coda-task-tests-key", scheduler="sync")
    users = sorted(day.samples, key=lambda u: -len(day.samples[u]))
    local = day.samples[users[0]]
    outside = [s for u in users[1:] for s in day.samples[u]]
    rng = np.random.default_rng(3)
    outside = [outside[i] for i in rng.permutation(len(outside))]  # batches mix the matched users
    return {"local": local, "outside": outside, "catalog": catalog_config(ml.items)}


@pytest.fixture(scope="module")
def global_blob(data) -> bytes:
    """The cloud's global model, trained from the library's DIN on the outside users' samples."""
    return train_global(data["outside"][:300], epochs=1, seed=5, catalog=data["catalog"])[0]


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=1) as sb:
        yield sb


@pytest.fixture(scope="module")
def tasks() -> dict:
    out = {}
    for name in ("coda_filter", "coda_train", "coda_infer"):
        manifest, files = validate_task_dir(TASKS / name)
        out[name] = (manifest, {p: b.decode() for p, b in files.items() if p.endswith(".py")})
        assert any(p.startswith("_lib/coda/") for p in out[name][1])  # the library travels in the bundle
    return out


class Device:
    """One device's storage, model store and host API, as the host wires them for the "coda" namespace."""

    def __init__(self, root: pathlib.Path, sandbox: Sandbox, tasks: dict, global_blob: bytes | None,
                 extra_ops: dict | None = None):
        self.storage = TaskStorage(root / "storage.sqlite3")
        self.models = ModelStore(root / "models")
        self.fetched: list[str] = []

        def fetch(name: str) -> bytes:
            self.fetched.append(name)
            if global_blob is None:
                raise FileNotFoundError(f"resource {name} is not published")
            return global_blob
        self.ops = make_model_ops(self.models, fetch)
        self.extra_ops = {**self.ops, **(extra_ops or {})}
        self.config: dict = {}  # the release's --set overrides, resolved per task as the platform does
        self.sandbox, self.tasks = sandbox, tasks

    def run(self, task: str, event: object):
        manifest, files = self.tasks[task]
        cfg = taskconfig.resolve(manifest.config, {k: v for k, v in self.config.items()
                                                   if k in {p.name for p in manifest.config}}, task)
        self.api = HostAPI(self.storage, NS, extra_ops=self.extra_ops, config=cfg)
        allowed = {op for op in self.api.allowed_apis() if op.split(".", 1)[0] in set(manifest.apis) | {"config"}}
        lim = manifest.limits
        limits = Limits(memory_mb=lim.memory_mb, cpu_seconds=lim.cpu_seconds, wall_seconds=lim.wall_seconds)
        return self.sandbox.run(files, manifest.entry, event, limits=limits, api_handler=self.api,
                                allowed_apis=allowed)

    def rows(self, table: str, where: dict | None = None) -> list[dict]:
        if table not in self.storage.table_names(NS):
            return []
        return self.storage.query(NS, table, where, "ts", limit=10_000)

    def put(self, key: str, value: object) -> None:
        self.storage.put(NS, key, value)

    def insert_local(self, samples, **overrides) -> list[dict]:
        rows = [{**sample_to_row(s), **overrides} for s in samples]
        self.storage.insert(NS, "local", rows)
        return rows

    def insert_outside(self, samples, batch_id="b1", state="new", scores=None) -> list[dict]:
        rows = [sample_to_row(s, batch_id=batch_id, state=state, score=None if scores is None else float(scores[i]))
                for i, s in enumerate(samples)]
        self.storage.insert(NS, "outside", rows)
        return rows

    def snapshot(self) -> dict:
        return {t: self.rows(t) for t in ("local", "outside")}

    def net(self, name: str, which: str = "M"):
        """A stored model as the library's net (the cloud-side import of the same files)."""
        got = self.models.load(name, which)
        make = classifier.Classifier if got["meta"]["arch"] == "classifier" else din.DIN
        net = make(got["meta"]["config"])
        net.set_params(got["params"])
        return net

    def predict(self, name: str, samples, which: str = "M") -> list[float]:
        net = self.net(name, which)
        batch = features.batch(as_dicts(samples), net.config["hist_len"], net.config.get("profile_dim", 0))
        return training.predict(net, batch).tolist()

    def create_ctr(self, catalog: dict, seed: int = 1, name: str = "ctr") -> None:
        net = din.DIN(catalog, seed)
        self.models.create(name, net.params(), {"arch": "din", "config": net.config})

    def close(self) -> None:
        self.storage.close()


@pytest.fixture
def device(tmp_path, sandbox, tasks, global_blob):
    dev = Device(tmp_path, sandbox, tasks, global_blob)
    dev.put("today", TODAY)
    yield dev
    dev.close()


BATCH = {"name": "batch_received", "payload": {"batch_id": "b1"}}
EXHAUSTED = {"name": "batches_exhausted", "payload": {}}


def fnv1a(text: str) -> int:
    h = 2166136261
    for ch in text:
        h = ((h ^ ord(ch)) * 16777619) % 2**32
    return h


def classifier_third(ids: list[str]) -> set[str]:
    """The documented 1/3 : 2/3 split: sort by (FNV-1a of sample_id, sample_id), the first (n+1)//3."""
    ranked = sorted(ids, key=lambda s: (fnv1a(s), s))
    return set(ranked[:(len(ids) + 1) // 3])


def copies(samples, *, day: int, flip: bool = False, tag: str = "c") -> list[coda_pb2.Sample]:
    """Copies of samples under new ids (and a new day), optionally with the click label flipped."""
    out = []
    for s in samples:
        c = coda_pb2.Sample()
        c.CopyFrom(s)
        c.sample_id = f"{tag}-{s.sample_id}"
        c.day = day
        if flip:
            c.label = 1.0 - s.label
        out.append(c)
    return out


def as_dicts(samples) -> list[dict]:
    return [sample_dict(s) for s in samples]


# --- manifests and rows -------------------------------------------------------------------------------

def test_manifests_share_the_coda_namespace_and_declare_their_triggers(tasks):
    triggers = {}
    for name, (m, _files) in tasks.items():
        assert m.namespace == "coda" and m.storage_namespace == "coda" and m.min_host_version == "0.1.0"
        triggers[name] = {(t.kind, t.event, t.table, t.min_rows) for t in m.triggers}
    assert triggers["coda_filter"] == {("event", "batch_received", "", 0)}
    assert triggers["coda_train"] == {("table_rows", "", "outside", 100), ("event", "batches_exhausted", "", 0)}
    assert ("event", "page_view:home", "", 0) in triggers["coda_infer"]
    assert "tunnel" in tasks["coda_train"][0].apis and "storage" not in tasks["coda_infer"][0].apis


def test_rows_round_trip_real_samples(data):
    import json
    s = data["local"][-1]
    row = sample_to_row(s, batch_id="b7", state="new", score=None)
    assert all(not isinstance(v, (list, dict)) for v in row.values())
    assert row["batch_id"] == "b7" and row["state"] == "new" and row["score"] is None
    assert json.loads(row["hist_items"]) == list(s.hist_items) and json.loads(row["item_cats"]) == list(s.item_cats)
    assert row["item_id"] == s.item_id and row["label"] == s.label and row["sample_id"] == s.sample_id


# --- coda_filter --------------------------------------------------------------------------------------

def test_filter_keeps_only_samples_scoring_at_least_sigma(device, data):
    sigma = 0.5
    device.config.update({"sigma": sigma})
    device.insert_local(data["local"][-150:])
    batch = data["outside"][:60]
    device.insert_outside(batch)
    res = device.run("coda_filter", BATCH)
    assert res.status == "ok", res.error
    counts = res.value

    ids = [s.sample_id for s in batch]
    third = classifier_third(ids)
    scored = [s for s in batch if s.sample_id not in third]
    assert counts["received"] == 60 and counts["trained_on"] == len(third) == 20
    assert counts["scored"] == len(scored) == 40 and counts["kept"] + counts["dropped"] == 40
    assert counts["kept"] > 0 and counts["dropped"] > 0  # both branches of the threshold are exercised

    # Rescore with the classifier the run left behind: kept = exactly the 2/3 scoring >= sigma.
    probs = device.predict("clf", scored)
    want = {s.sample_id: p for s, p in zip(scored, probs) if p >= sigma}
    rows = device.rows("outside")
    assert {r["state"] for r in rows} == {"kept"}
    assert {r["sample_id"]: r["score"] for r in rows} == pytest.approx(want, abs=1e-6)
    assert not third & {r["sample_id"] for r in rows}  # the classifier's 1/3 were deleted after use
    info = device.models.info("clf")
    assert info["meta"]["arch"] == "classifier" and info["version"] == 1  # Algorithm 2 line 3: created once
    assert info["meta"]["config"]["n_items"] == data["catalog"]["n_items"]  # the catalogue, via the global model
    assert device.fetched == ["coda/global_model"] and device.models.info("ctr")["meta"]["source"] == "global"
    assert len(device.rows("local")) == 150  # the filter never touches local samples


def test_filter_with_no_new_rows_or_no_local_samples_changes_nothing(device, data):
    res = device.run("coda_filter", BATCH)  # no tables at all yet
    assert res.status == "ok" and res.value["received"] == 0
    device.insert_outside(data["outside"][:30])
    before = device.snapshot()
    res = device.run("coda_filter", BATCH)
    assert res.status == "ok" and res.value["received"] == 30 and "no local samples" in res.value["skipped"]
    assert device.snapshot() == before and not device.models.exists("clf")


def test_filter_forced_cleanup_halves_outside_lowest_score_first(device, data):
    kept = data["outside"][:150]
    scores = np.linspace(0.01, 0.99, 150)[np.random.default_rng(0).permutation(150)]
    device.insert_outside(kept, state="kept", scores=scores)
    device.insert_outside(data["outside"][150:220], batch_id="b2")  # 70 unscored rows count as score 0
    res = device.run("coda_filter", BATCH)
    assert res.status == "ok", res.error
    assert res.value["cleaned"] == 110 and res.value["received"] == 0
    rows = device.rows("outside")
    top = {s.sample_id for s, _ in sorted(zip(kept, scores), key=lambda p: -p[1])[:110]}
    assert {r["sample_id"] for r in rows} == top and {r["state"] for r in rows} == {"kept"}


def test_filter_drops_new_rows_already_kept(device, data):
    device.insert_local(data["local"][-50:])
    device.insert_outside(data["outside"][:10], state="kept", scores=[0.9] * 10)
    device.insert_outside(data["outside"][:10])  # the same samples again, e.g. re-sent on another day
    res = device.run("coda_filter", BATCH)
    assert res.status == "ok", res.error
    assert res.value["duplicates"] == 10 and res.value["received"] == 0
    assert len(device.rows("outside")) == 10


# --- coda_train ---------------------------------------------------------------------------------------

def test_train_lifecycle_and_split_t_tprime(device, data):
    device.config.update({"max_rows": 5000})
    local = data["local"]
    device.insert_local(local)
    device.create_ctr(data["catalog"])
    kept = data["outside"][:40]
    device.insert_outside(kept, state="kept", scores=np.linspace(0.3, 0.9, 40))
    fresh = device.insert_outside(data["outside"][40:50], batch_id="b9")  # not filtered yet: must stay
    val = [s for s in local if s.day >= TODAY - 3]
    train_local = [s for s in local if TODAY - 7 <= s.day < TODAY - 3]
    expected_before = coda_module("metrics").auc([s.label for s in val], device.predict("ctr", val))

    res = device.run("coda_train", EXHAUSTED)
    assert res.status == "ok", res.error
    ctr = res.value["ctr"]
    assert ctr["n_val"] == len(val) and ctr["n_train"] == len(train_local) + 40
    assert ctr["metric"] == "auc" and ctr["before"] == pytest.approx(expected_before, abs=1e-9)
    left = {r["sample_id"] for r in device.rows("local")}
    assert left == {s.sample_id for s in local if s.day >= TODAY - 7}  # older than t' days: removed
    assert len(left) < len(local)
    assert {r["sample_id"] for r in device.rows("outside")} == {r["sample_id"] for r in fresh}
    assert set(res.value) == {"ctr"}  # the Local arm runs only when the experiment asks for it


def test_train_forced_cleanup_halves_local_oldest_first(device, data):
    local = [s for s in data["local"] if s.day >= TODAY - 7]  # nothing expires: only the size rule acts
    assert len(local) >= 400
    device.insert_local(local)
    device.create_ctr(data["catalog"])
    res = device.run("coda_train", EXHAUSTED)
    assert res.status == "ok", res.error
    keep = len(local)
    while keep >= 200:
        keep //= 2
    oldest_first = sorted(range(len(local)), key=lambda i: (local[i].ts, i))  # ties: insertion order
    survivors = {local[i].sample_id for i in oldest_first[len(local) - keep:]}
    assert {r["sample_id"] for r in device.rows("local")} == survivors and keep < 200


def test_train_gate_rejects_a_worse_update(device, data):
    """Training data = the validation samples with flipped labels: the update can only get worse."""
    device.config.update({"lr": 0.05, "epochs": 3, "max_rows": 1000})
    val = [s for s in data["local"] if s.day >= TODAY - 3][:120]
    device.insert_local(val)
    device.insert_local(copies(val, day=TODAY - 5, flip=True, tag="flip"))
    device.insert_outside(copies(val[:60], day=TODAY, flip=True, tag="out"), state="kept", scores=[0.8] * 60)
    device.create_ctr(data["catalog"])
    probe = val[:30]
    before = device.predict("ctr", probe)
    res = device.run("coda_train", EXHAUSTED)
    assert res.status == "ok", res.error
    ctr = res.value["ctr"]
    assert ctr["committed"] is False and ctr["after"] == ctr["before"] and ctr["n_train"] == 180
    assert device.models.info("ctr")["version"] == 1 == ctr["version"] and not device.models.info("ctr")["has_buffer"]
    assert device.predict("ctr", probe) == before
    assert device.rows("outside") == []  # used samples are removed whether or not M was updated


def a_day_that_validates_better(device, data) -> None:
    """120 validation samples, the same samples as training data and 50 kept outside copies: an update
    that fits them validates better."""
    device.config.update({"max_rows": 1000})
    val = [s for s in data["local"] if s.day >= TODAY - 3][:120]
    device.insert_local(val)
    device.insert_local(copies(val, day=TODAY - 5, tag="same"))
    device.insert_outside(copies(val[:50], day=TODAY, tag="out"), state="kept", scores=[0.8] * 50)


def test_train_commits_a_better_update_and_runs_the_local_arm(device, data):
    device.put("experiment.local_arm", True)
    a_day_that_validates_better(device, data)
    for name in ("ctr", "ctr_local"):
        device.create_ctr(data["catalog"], name=name)
    res = device.run("coda_train", EXHAUSTED)
    assert res.status == "ok", res.error
    ctr, loc = res.value["ctr"], res.value["ctr_local"]
    assert ctr["committed"] is True and ctr["after"] > ctr["before"] and ctr["version"] == 2
    assert device.models.info("ctr")["version"] == 2
    assert ctr["n_train"] == 170 and loc["n_train"] == 120 and loc["n_val"] == ctr["n_val"] == 120
    assert loc["version"] == device.models.info("ctr_local")["version"] == (2 if loc["committed"] else 1)
    assert device.rows("outside") == []


def test_train_on_a_host_without_delta_commits_sends_the_whole_model(tmp_path, sandbox, tasks, data, global_blob):
    """A host from before `model.commit(rows=...)` refuses the delta; the script commits in full."""
    calls = []
    dev = Device(tmp_path, sandbox, tasks, global_blob)

    def old_commit(name: str, params: dict, base_version: int, meta: dict | None = None) -> dict:
        calls.append(sorted(params))
        return dev.ops["model.commit"](name, params, base_version, meta)
    dev.extra_ops["model.commit"] = old_commit
    try:
        dev.put("today", TODAY)
        a_day_that_validates_better(dev, data)
        dev.create_ctr(data["catalog"])
        res = dev.run("coda_train", EXHAUSTED)
        assert res.status == "ok", res.error
        assert res.value["ctr"]["committed"] is True and dev.models.info("ctr")["version"] == 2
        # the delta never reached the op (its signature refused rows=); the whole model did, once
        assert calls == [sorted(dev.models.load("ctr")["params"])]
    finally:
        dev.close()


def test_train_release_config_limits_the_update_scope_and_min_val(device, data):
    """A release with update_scope=last commits an update in which only the output layer moved
    (MNN trained in the sandboxed child); min_val above the validation size skips training."""
    device.config.update({"max_rows": 1000, "update_scope": "last", "reg_to_start": 0.1, "gate": "none"})
    val = [s for s in data["local"] if s.day >= TODAY - 3][:120]
    device.insert_local(val)
    device.insert_local(copies(val, day=TODAY - 5, tag="same"))
    device.create_ctr(data["catalog"])
    start = device.net("ctr").params()
    res = device.run("coda_train", EXHAUSTED)
    assert res.status == "ok", res.error
    assert res.value["ctr"]["committed"] is True and device.models.info("ctr")["version"] == 2
    end = device.net("ctr").params()
    last = max(int(k[5:]) for k in end if k.startswith("mlp_w"))
    moved = {k for k in end if not np.array_equal(start[k], end[k])}
    assert moved == {f"mlp_w{last}", f"mlp_b{last}"}
    device.config.update({"min_val": 121})
    res = device.run("coda_train", EXHAUSTED)
    assert res.status == "ok", res.error
    assert "min_val" in res.value["ctr"]["skipped"] and device.models.info("ctr")["version"] == 2


def test_train_table_rows_trigger_waits_for_train_at_kept_samples(device, data):
    device.insert_local(data["local"][-100:])
    device.insert_outside(data["outside"][:20], state="kept", scores=[0.5] * 20)
    device.insert_outside(data["outside"][20:120], batch_id="b2")  # 120 rows, but only 20 are filtered
    device.create_ctr(data["catalog"])
    res = device.run("coda_train", {"name": "table_rows", "table": "outside", "rows": 120, "min_rows": 100})
    assert res.status == "ok", res.error
    assert "train_at" in res.value["ctr"]["skipped"] and res.value["ctr"]["committed"] is False
    assert len(device.rows("outside")) == 120 and device.models.info("ctr")["version"] == 1


def test_train_without_validation_samples_skips_and_says_why(device, data):
    device.insert_local([s for s in data["local"] if s.day <= 6][-50:])  # nothing within the last t days
    device.create_ctr(data["catalog"])
    res = device.run("coda_train", EXHAUSTED)
    assert res.status == "ok", res.error
    assert "validate" in res.value["ctr"]["skipped"] and res.value["ctr"]["n_val"] == 0


def test_train_on_a_device_with_batches_but_no_local_samples_yet_skips(device, data):
    """A new user: the day is known and matched batches arrived, but the app logged no behaviour yet."""
    device.insert_outside(data["outside"][:120], batch_id="b1", state="kept", scores=[0.9] * 120)
    device.create_ctr(data["catalog"])
    res = device.run("coda_train", {"name": "table_rows", "table": "outside"})
    assert res.status == "ok", res.error
    assert "no local samples" in res.value["ctr"]["skipped"]
    assert len(device.rows("outside")) == 120  # nothing used up


def test_train_without_a_global_model_fails_clearly(tmp_path, sandbox, tasks, data):
    dev = Device(tmp_path, sandbox, tasks, None)
    dev.put("today", TODAY)
    dev.insert_local([s for s in data["local"] if s.day >= TODAY - 6][::4])  # validation and training days
    dev.insert_outside(data["outside"][:20], state="kept", scores=[0.5] * 20)
    res = dev.run("coda_train", EXHAUSTED)
    assert res.status == "error" and "coda/global_model" in res.error and "not published" in res.error
    assert len(dev.rows("outside")) == 20 and not dev.models.exists("ctr")
    dev.close()


def test_train_creates_ctr_from_the_global_model_and_m0_is_the_clouds(device, data, global_blob):
    device.insert_local([s for s in data["local"] if s.day >= TODAY - 6][::3])
    res = device.run("coda_train", EXHAUSTED)
    assert res.status == "ok", res.error
    info = device.models.info("ctr")
    assert info["meta"]["arch"] == "din" and info["M0"]["source"] == "resource:coda/global_model"
    # M0 is the cloud's model: it scores exactly like the published blob, through the same library.
    from walle.platform.coda.global_model import load_global
    got = device.predict("ctr", data["local"][:20], which="M0")
    ref = training.predict(load_global(global_blob), features.batch(as_dicts(data["local"][:20]), 50))
    assert got == pytest.approx([float(x) for x in ref], abs=1e-6)
    assert res.value["ctr"]["n_val"] > 0


def test_train_restarts_from_each_newer_global_model(tmp_path, sandbox, tasks, data, global_blob):
    """5.2 (4) with a cloud that retrains daily: a run after a new global version restarts M (and M0)
    from it, then trains on top; a run with no new version keeps M. (A model the script made itself is
    never replaced: the other tests' `create_ctr` models run with no tunnel op at all.)"""
    import hashlib

    from walle.device_host.models import blob
    published = [global_blob]

    def digest(b: bytes) -> str:
        return "sha256:" + hashlib.sha256(b).hexdigest()

    def down(name: str, version: str = "", format: str = "auto") -> dict:
        assert name == "coda/global_model" and format == "info"  # only the info crosses, not the blob
        return {"name": name, "version": f"v{len(published)}", "digest": digest(published[-1]), "metadata": {}}
    dev = Device(tmp_path, sandbox, tasks, None)
    dev.ops = make_model_ops(dev.models, lambda name: published[-1])
    dev.extra_ops = {**dev.ops, "tunnel.down": down}
    dev.put("today", TODAY)
    dev.put("experiment.local_arm", True)
    dev.insert_local([s for s in data["local"] if s.day >= TODAY - 6][::3])

    def run() -> dict:
        res = dev.run("coda_train", EXHAUSTED)
        assert res.status == "ok", res.error
        return res.value
    first = run()
    assert first["ctr"]["restarted"] and first["ctr"]["base_resource"]["digest"] == digest(global_blob)
    v1 = dev.models.info("ctr")["version"]
    again = run()  # same global version: M is kept and trained further
    assert not again["ctr"]["restarted"] and dev.models.info("ctr")["version"] >= v1
    # the cloud retrains and publishes a new version: both arms restart from it
    newer = train_global(data["outside"][300:700], epochs=1, seed=6, catalog=data["catalog"])[0]
    published.append(newer)
    before = dev.models.info("ctr")["version"]
    got = run()
    for name in ("ctr", "ctr_local"):
        info = dev.models.info(name)
        assert got[name]["restarted"] and got[name]["base_resource"]["digest"] == digest(newer), got[name]
        assert info["m0_meta"]["resource"] == {"name": "coda/global_model", "digest": digest(newer)}
        assert info["M0"]["source"] == "resource:coda/global_model"
        m0_params, _meta = blob.unpack(dev.models._read(name, "M0"))
        want, _ = blob.unpack(newer)
        assert all(np.array_equal(m0_params[k], want[k]) for k in want)  # M0 is the new global, exactly
        if got[name]["committed"]:  # the day's update applies on top, and says what it started from
            assert info["meta"]["base_resource"]["digest"] == digest(newer)
    assert dev.models.info("ctr")["version"] > before
    dev.close()


# --- coda_infer ---------------------------------------------------------------------------------------

def test_infer_ranks_candidates_by_the_models_scores(device, data):
    device.create_ctr(data["catalog"], seed=4)
    net = device.net("ctr")
    training.train(net, features.batch(as_dicts(data["outside"][:300]), 50), 1, 0.01, 0)
    device.models.commit("ctr", net.params(), {"arch": "din", "config": net.config},
                         device.models.begin_update("ctr")["version"])
    cands = as_dicts(data["local"][-25:])
    cands[0] = sample_to_row(data["local"][-25])  # list fields as stored JSON text are accepted too
    res = device.run("coda_infer", {"name": "page_view:home", "payload": {"candidates": cands}})
    assert res.status == "ok", res.error
    probs = device.predict("ctr", data["local"][-25:])
    order = sorted(range(25), key=lambda i: (-probs[i], i))
    assert res.value["ranking"] == [data["local"][-25 + i].item_id for i in order]
    assert res.value["scores"] == pytest.approx([probs[i] for i in order], abs=1e-7)
    assert res.value["scores"] == sorted(res.value["scores"], reverse=True)
    assert res.value["served_from"] == "M" and res.value["version"] == 2
    # While M is being replaced (write lock held), the backup M0 serves the page (paper Figure 6, step 5).
    with device.models.write_lock("ctr"):
        res = device.run("coda_infer", {"name": "page_view:detail", "payload": {"candidates": cands}})
    assert res.status == "ok" and res.value["served_from"] == "M0" and res.value["version"] == 1
    m0 = device.predict("ctr", data["local"][-25:], which="M0")
    assert res.value["ranking"] == [data["local"][-25 + i].item_id for i in sorted(range(25), key=lambda i: (-m0[i], i))]


def test_infer_scores_one_page_with_several_models_in_one_run(device, data):
    """The demo's evaluation page: CoDA's and Local's models score the same candidates in one ask,
    in the candidates' order (duplicated items allowed: the caller ranks)."""
    device.create_ctr(data["catalog"], seed=4, name="ctr")
    device.create_ctr(data["catalog"], seed=9, name="ctr_local")
    samples = data["local"][-12:] + data["local"][-3:]
    res = device.run("coda_infer", {"name": "page_view:home",
                                    "payload": {"candidates": as_dicts(samples), "models": ["ctr", "ctr_local"]}})
    assert res.status == "ok", res.error
    got = res.value["models"]
    assert set(got) == {"ctr", "ctr_local"}
    for name in ("ctr", "ctr_local"):
        assert got[name]["scores"] == pytest.approx(device.predict(name, samples), abs=1e-7)
        assert got[name]["served_from"] == "M" and got[name]["version"] == 1
    assert got["ctr"]["scores"] != got["ctr_local"]["scores"]
    bad = device.run("coda_infer", {"name": "page_view:home", "payload": {"candidates": as_dicts(samples),
                                                                          "models": ["ctr", 3]}})
    assert bad.status == "error" and "payload.models" in bad.error


def test_infer_on_a_fresh_device_ranks_with_the_global_model(tmp_path, sandbox, tasks, global_blob, data):
    """Before coda_train ever ran, the first ask creates M from the global model and ranks with it."""
    (tmp_path / "fresh").mkdir()
    (tmp_path / "orphan").mkdir()
    fresh = Device(tmp_path / "fresh", sandbox, tasks, global_blob)
    try:
        cands = as_dicts(data["local"][-25:])
        res = fresh.run("coda_infer", {"name": "page_view:home", "payload": {"candidates": cands}})
        assert res.status == "ok", res.error
        assert fresh.fetched == ["coda/global_model"] and res.value["served_from"] == "M"
        glob = fresh.predict("ctr", data["local"][-25:])
        assert res.value["ranking"] == [cands[i]["item_id"] for i in sorted(range(25), key=lambda i: (-glob[i], i))]
        assert fresh.models.load("ctr", "M0")["meta"]["source"] == "global"  # the cloud's blob, as published
    finally:
        fresh.close()
    orphan = Device(tmp_path / "orphan", sandbox, tasks, None)  # no global model published yet
    try:
        res = orphan.run("coda_infer", {"name": "page_view:home", "payload": {"candidates": cands}})
        assert res.status == "error" and "coda/global_model" in res.error and not orphan.models.exists("ctr")
    finally:
        orphan.close()


# --- hostile input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("payload, words", [
    (None, ["payload", "candidates"]),
    ({}, ["candidates must be a non-empty list"]),
    ({"candidates": "item 5"}, ["candidates must be a non-empty list"]),
    ({"candidates": []}, ["candidates must be a non-empty list"]),
    ({"candidates": [7, 8]}, ["candidates[0]", "object"]),
    ({"candidates": [{"item_id": "5"}]}, ["candidates[0].item_id", "integer"]),
    ({"candidates": [{"item_id": 5, "hist_items": "[1, 2"}]}, ["candidates[0].hist_items", "JSON"]),
    ({"candidates": [{"item_id": 5, "hist_items": [1, 2], "hist_cats": [3]}]}, ["hist_items", "hist_cats"]),
    ({"candidates": [{"item_id": 5}], "model": 3}, ["payload.model"]),
    ({"candidates": [{"item_id": 5}], "model": ""}, ["payload.model"]),
])
def test_infer_hostile_payloads_end_in_clear_errors(device, data, payload, words):
    device.create_ctr(data["catalog"], seed=4)
    res = device.run("coda_infer", {"name": "page_view:home", "payload": payload})
    assert res.status == "error"
    for w in words:
        assert w in res.error


def test_hostile_config_rows_and_events_change_nothing(device, data):
    device.insert_local(data["local"][-60:])
    device.insert_outside(data["outside"][:30])
    device.create_ctr(data["catalog"])
    before = device.snapshot()
    cases = [
        ("coda_train", EXHAUSTED, {"config": {"t": 9, "t_prime": 3}}, ["t_prime"]),
        ("coda_train", EXHAUSTED, {"config": {"din_mlp": "wide"}}, ["din_mlp"]),
        ("coda_train", EXHAUSTED, {"config": {"update_scope": "last+head"}}, ["update_scope"]),
        ("coda_train", EXHAUSTED, {"today": "monday"}, ["today"]),
        ("coda_train", EXHAUSTED, {"experiment.local_arm": "yes"}, ["experiment.local_arm"]),
        ("coda_train", "not an event", {}, ["event must be an object"]),
        ("coda_filter", ["x"], {}, ["event must be an object"]),
    ]
    for task, event, kv, words in cases:
        for k, v in kv.items():
            if k == "config":
                device.config = v
            else:
                device.put(k, v)
        res = device.run(task, event)
        assert res.status == "error", (task, kv, res.value)
        for w in words:
            assert w in res.error, (w, res.error)
        for k in kv:
            device.storage.delete(NS, k)
        device.config = {}
        device.put("today", TODAY)
        assert device.snapshot() == before
    # A malformed stored row is named, and nothing is written.
    device.storage.insert(NS, "outside", [{**sample_to_row(data["outside"][40], batch_id="b2", state="new",
                                                          score=None), "hist_items": "not json"}])
    before = device.snapshot()
    res = device.run("coda_filter", BATCH)
    assert res.status == "error" and "hist_items" in res.error and data["outside"][40].sample_id in res.error
    assert device.snapshot() == before and not device.models.exists("clf")
    device.storage.insert(NS, "local", [{**sample_to_row(data["local"][0]), "day": "Tuesday"}])
    before = device.snapshot()
    res = device.run("coda_train", EXHAUSTED)
    assert res.status == "error" and "'day' must be an integer" in res.error and device.snapshot() == before
    device.storage.delete_rows(NS, "local", {"day": "Tuesday"})
    # The host is fine: once the row is gone, the same task runs normally.
    device.storage.delete_rows(NS, "outside", {"sample_id": data["outside"][40].sample_id})
    res = device.run("coda_filter", BATCH)
    assert res.status == "ok" and res.value["received"] == 30
