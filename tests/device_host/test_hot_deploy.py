"""Hot deploy end to end: a connected device host picks up each release (and a rollback) through the
WatchTasks stream within seconds and runs the new version with nothing restarted; run and delivery
reports reach the platform's release stats."""
import pathlib
import shutil
import time

import numpy as np
import pytest

from walle.device_host.host import DeviceHost
from walle.device_host.identity import Credentials
from walle.device_host.sandbox import Sandbox
from walle.platform.manifest import validate_task_dir
from walle.platform.server import build_server
from walle.platform.service import Platform
from walle.protos import admin_pb2, bundle

TOML = """name = "probe"
entry = "main.py"
apis = ["log", "storage"]
min_host_version = "0.1.0"
[limits]
memory_mb = 64
cpu_seconds = 2
wall_seconds = 5
[[triggers]]
kind = "event"
event = "page_view:home"
"""
MAIN = """from walle import log, storage

def main(event):
    n = storage.get("runs", 0) + 1
    storage.put("runs", n)
    log.info("probe {V} run " + str(n))
    return {"version": "{V}", "runs": n}
"""


def submit(platform, tmp, v):
    src = tmp / f"probe-{v}"
    src.mkdir()
    (src / "task.toml").write_text(TOML)
    (src / "main.py").write_text(MAIN.replace("{V}", v))
    _m, files = validate_task_dir(src)
    return platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), message=v, author="t"))


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def sandbox():
    sb = Sandbox(workers=1)
    yield sb
    sb.close()


def platform_and_device(tmp_path, sandbox):
    """A live platform and one enrolled, connected-ready device host."""
    platform = Platform(tmp_path / "platform")
    _server, port, stop = build_server(platform, port=0)
    token = platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="phone-1")).token
    host = DeviceHost(tmp_path / "device", f"127.0.0.1:{port}", attrs={"user_id": "u1", "os": "android"},
                      sandbox=sandbox, credentials=Credentials("phone-1", token))
    return platform, stop, host


def test_release_update_and_rollback_reach_a_running_device(tmp_path, sandbox):
    platform, stop, host = platform_and_device(tmp_path, sandbox)
    try:
        host.start()
        assert wait_for(lambda: host.sync.revision != "")  # first pull done (nothing released yet)
        # The platform asks for a pull every 60 s: changes seen within seconds came through WatchTasks.
        assert host.sync.poll_after == 60
        assert host.installed() == {}

        v1 = submit(platform, tmp_path, "v1")
        r1 = platform.CreateRelease(admin_pb2.CreateReleaseRequest(task="probe", version=v1.version,
                                                                   rule='os == "android"'))
        assert wait_for(lambda: "probe" in host.installed() and host.installed()["probe"].version == v1.version)
        assert host.run_task("probe", {}).value == {"version": "v1", "runs": 1}

        v2 = submit(platform, tmp_path, "v2")
        t0 = time.monotonic()
        r2 = platform.CreateRelease(admin_pb2.CreateReleaseRequest(task="probe", version=v2.version,
                                                                   rule='os == "android"'))
        assert wait_for(lambda: host.installed()["probe"].version == v2.version, timeout=10)
        took = time.monotonic() - t0
        # The app's event goes through the trigger queue and runs the new version; storage carried over.
        assert host.emit("page_view:home", {"page": "home"}) == ["probe"]
        assert host.triggers.wait_idle(10)
        assert host.run_task("probe", {}).value == {"version": "v2", "runs": 3}

        r3 = platform.Rollback(admin_pb2.RollbackRequest(task="probe", actor="t"))
        assert r3.version == v1.version
        assert wait_for(lambda: host.installed()["probe"].version == v1.version, timeout=10)
        assert host.installed()["probe"].release_id == r3.id
        assert host.run_task("probe", {}).value == {"version": "v1", "runs": 4}

        assert host.up.flush(timeout=10)
        s1 = platform.GetRelease(admin_pb2.ReleaseRef(id=r1.id)).stats
        s2 = platform.GetRelease(admin_pb2.ReleaseRef(id=r2.id)).stats
        s3 = platform.GetRelease(admin_pb2.ReleaseRef(id=r3.id)).stats
        assert (s1.delivered, s1.ran, s1.runs) == (1, 1, 1)
        assert (s2.delivered, s2.ran, s2.runs) == (1, 1, 2) and s2.failed == 0
        assert (s3.delivered, s3.ran, s3.runs) == (1, 1, 1)
        triggers = [r["trigger"] for r in platform.state.reports("run_report") if r["release_id"] == r2.id]
        assert triggers == ["event:page_view:home", "manual"]
        print(f"v2 reached the device {took:.2f}s after the release")
    finally:
        host.close()
        stop(0)


def test_device_run_once_cli(tmp_path):
    from click.testing import CliRunner

    from walle.device_host.cli import device_run
    platform = Platform(tmp_path / "platform")
    server, port, stop = build_server(platform, port=0)
    try:
        v1 = submit(platform, tmp_path, "v1")
        rel = platform.CreateRelease(admin_pb2.CreateReleaseRequest(task="probe", version=v1.version))
        token = platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="cli-phone")).token
        cred = tmp_path / "cred.json"
        Credentials("cli-phone", token, f"127.0.0.1:{port}").save(cred)
        assert oct(cred.stat().st_mode & 0o777) == "0o600"
        data = tmp_path / "dev"
        args = ["--data-dir", str(data), "--token-file", str(cred), "--attrs", "user_id=u9,os=android",
                "--once", "--event", 'page_view:home={"page": "home"}']
        res = CliRunner().invoke(device_run, args)
        assert res.exit_code == 0, res.output
        assert (data / "credentials.json").exists() and (data / "tasks" / "probe" / "current.json").exists()
        stats = platform.GetRelease(admin_pb2.ReleaseRef(id=rel.id)).stats
        assert (stats.delivered, stats.ran, stats.runs) == (1, 1, 1)
        bad = CliRunner().invoke(device_run, ["--data-dir", str(data), "--attrs", "colour=red", "--once"])
        assert bad.exit_code == 2 and "unknown device attribute 'colour'" in bad.output
        platform.RevokeDevice(admin_pb2.DeviceRef(device_id="cli-phone"))
        res = CliRunner().invoke(device_run, ["--data-dir", str(data), "--once"])
        assert res.exit_code == 6, res.output  # unauthenticated: the documented code
    finally:
        stop(0)


# ---- the CoDA algorithm, hot deployed -------------------------------------------------------------

TASKS = pathlib.Path(__file__).resolve().parents[2] / "tasks"
VOCAB = {"n_items": 200, "n_cats": 11}


def coda_samples(n, rng, day, prefix):
    """Synthetic CoDA samples: item i has category i % 10 + 1; clicked when the user likes it."""
    from walle.protos import coda_pb2
    out = []
    for i in range(n):
        liked = (3, 7) if prefix == "local" else tuple(rng.choice(np.arange(1, 11), 2, replace=False))
        hist = [int(c - 1 + 10 * rng.integers(1, 19)) for c in rng.choice(liked, int(rng.integers(1, 20)))]
        it = int(rng.integers(1, 200))
        out.append(coda_pb2.Sample(sample_id=f"{prefix}-{day}-{i}", day=day, ts=day * 1000 + i, item_id=it,
                                   item_cats=[it % 10 + 1], hist_items=hist, hist_cats=[h % 10 + 1 for h in hist],
                                   label=float(rng.random() < (0.9 if it % 10 + 1 in liked else 0.1))))
    return out


def submit_coda(platform, tmp, name, version_tag, edit=None):
    """Submit tasks/<name> with its library; `edit(main_py) -> main_py` makes a changed release."""
    src = tmp / version_tag / name
    shutil.copytree(TASKS / name, src)
    if edit is not None:
        (src / "main.py").write_text(edit((src / "main.py").read_text()))
    _m, files = validate_task_dir(src, lib_root=TASKS / "_lib")
    return platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), message=version_tag,
                                                           author="t"))


def release(platform, host, name, tv):
    config = {"t": "0", "t_prime": "3", "max_rows": "1000"} if name == "coda_train" else {"t_prime": "3"}
    platform.CreateRelease(admin_pb2.CreateReleaseRequest(task=name, version=tv.version, rule='os == "android"',
                                                          config=config))
    assert wait_for(lambda: name in host.installed() and host.installed()[name].version == tv.version)


@pytest.mark.slow
def test_coda_model_changes_hot_deploy_and_roll_back(tmp_path, sandbox):
    """coda_train and coda_filter v1 train; coda_filter v2 changes the classifier's width in its code,
    a coda_train release changes the DIN's MLP by per-release config; the running host trains them (the script migrates the stored model: same-shaped
    parameters kept, the rest fresh), and after a rollback v1 trains its own architecture again."""
    from walle.device_host.sample_client import item_row
    fields = ["sample_id", "day", "ts", "label", "item_id", "item_cats", "hist_items", "hist_cats", "profile"]
    sample_to_row = lambda s, **columns: item_row(s, fields, columns)  # noqa: E731  (as coda_fetch's pull writes)
    from walle.platform.coda.global_model import train_global
    rng = np.random.default_rng(0)
    platform, stop, host = platform_and_device(tmp_path, sandbox)
    try:
        data, _m = train_global([s for d in (1, 2) for s in coda_samples(300, rng, d, "global")], epochs=1, seed=0,
                                catalog=VOCAB)
        platform.PublishResource(admin_pb2.PublishResourceRequest(name="coda/global_model", data=data, actor="t"))
        st = host.storage
        st.put("coda", "today", 5)
        st.insert("coda", "local", [sample_to_row(s) for d in (3, 4, 5) for s in coda_samples(60, rng, d, "local")])
        host.start()
        models = host.models.scope("coda")

        def run(name, batch=None):
            if batch is not None:
                st.insert("coda", "outside", [sample_to_row(s, batch_id=f"b{batch}", state="new", score=None)
                                              for s in coda_samples(60, rng, 5, f"out{batch}")])
            event = {"name": "batch_received"} if name == "coda_filter" else {"name": "batches_exhausted"}
            res = host.run_task(name, event)
            assert res.status == "ok", res.error
            return res.value

        v1f = submit_coda(platform, tmp_path, "coda_filter", "v1")
        v1t = submit_coda(platform, tmp_path, "coda_train", "v1")
        release(platform, host, "coda_filter", v1f)
        release(platform, host, "coda_train", v1t)
        assert run("coda_filter", 1)["trained_on"] == 20
        assert run("coda_train")["ctr"]["n_val"] == 60
        assert models.info("ctr")["shapes"]["mlp_w0"] == [32, 32] and models.info("clf")["shapes"]["w1"] == [32, 16]

        v2f = submit_coda(platform, tmp_path, "coda_filter", "v2", lambda s: s.replace(
            "cfg = rows.settings()", "cfg = rows.settings()\n    cfg[\"clf_hidden\"] = 24"))
        release(platform, host, "coda_filter", v2f)
        # coda_train v2: the same code, a release that changes the DIN's MLP (per-release config).
        r2 = platform.CreateRelease(admin_pb2.CreateReleaseRequest(
            task="coda_train", version=v1t.version, rule='os == "android"',
            config={"t": "0", "t_prime": "3", "max_rows": "1000", "din_mlp": "48,16,8"}))
        assert wait_for(lambda: host.installed()["coda_train"].release_id == r2.id)
        run("coda_filter", 2)
        out = run("coda_train")["ctr"]
        assert out["committed"] and "mlp_w0" in out["migrated"] and "item_emb" not in out["migrated"]
        info = models.info("ctr")
        assert info["shapes"]["mlp_w0"] == [32, 48] and info["shapes"]["mlp_w3"] == [8, 1]
        assert info["meta"]["config"]["mlp"] == [48, 16, 8]
        assert models.info("clf")["shapes"]["w1"] == [32, 24]

        platform.Rollback(admin_pb2.RollbackRequest(task="coda_filter", actor="t"))  # to v1's code
        r5 = platform.CreateRelease(admin_pb2.CreateReleaseRequest(  # v1's config again (same code)
            task="coda_train", version=v1t.version, rule='os == "android"',
            config={"t": "0", "t_prime": "3", "max_rows": "1000"}))
        assert wait_for(lambda: host.installed()["coda_train"].release_id == r5.id
                        and host.installed()["coda_filter"].version == v1f.version)
        assert host.installed()["coda_train"].config()["din_mlp"] == ""
        run("coda_filter", 3)
        out = run("coda_train")["ctr"]
        assert out["committed"] and "mlp_w3" not in str(models.info("ctr")["shapes"])
        assert models.info("ctr")["shapes"]["mlp_w0"] == [32, 32] and models.info("clf")["shapes"]["w1"] == [32, 16]
        # The store's rollback reaches the global model again, whatever the scripts did.
        models.rollback("ctr")
        assert models.load("ctr")["meta"]["source"] == "global"
    finally:
        host.close()
        stop(0)
