"""The demo drives the deployment: a short run of the CoDA work cycle for a few MovieLens users (a served
platform over real gRPC with TLS, real device hosts, users talking to their devices through the app
interface only, the cloud's persistent day advanced by the daily pipeline), the three-arm evaluation on
held-out data, and the harness's hands kept off device storage, models and cloud tables."""
import ast
import json
import pathlib

import pytest
from click.testing import CliRunner

from walle.platform.cli import main
from walle.platform.coda import experiment, simulator
from walle.platform.coda.experiment import Config, Experiment

# What the harness must never touch: device storage and model stores, the host's internals that write
# them, and the cloud's tables (raw behaviour, key-value mappings, platform state).
BANNED_MODULES = ("walle.device_host.storage", "walle.device_host.models", "walle.device_host.sample_client",
                  "walle.device_host.host", "walle.device_host.tunnel", "walle.platform.coda.rawlog",
                  "walle.platform.coda.kvstore", "walle.platform.coda.mappings", "walle.platform.state",
                  "sqlite3", "redis")
BANNED_ATTRIBUTES = {"storage", "models", "app_log", "raw", "mappings", "day_samples", "insert", "put", "put_many",
                     "delete_rows", "delete_many", "run_day", "up", "down", "_run", "create", "commit",
                     "begin_update", "publish_global_model", "load_catalog_doc"}


def imported_modules(module) -> set[str]:
    """Absolute names of every module `module`'s source imports (relative imports resolved)."""
    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    package = module.__name__.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def attributes_used(module) -> set[str]:
    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}


@pytest.mark.parametrize("module", [experiment, simulator], ids=["experiment", "simulator"])
def test_the_harness_never_touches_device_storage_models_or_cloud_tables(module):
    imports = imported_modules(module)
    touched = sorted(m for m in imports for banned in BANNED_MODULES if m == banned or m.startswith(banned + "."))
    assert not touched, f"{module.__name__} imports {touched}"
    assert not attributes_used(module) & BANNED_ATTRIBUTES, sorted(attributes_used(module) & BANNED_ATTRIBUTES)


def test_the_user_simulator_only_emits_and_asks():
    """The users know their device only as an app: no walle module at all, only emit and ask."""
    imports = imported_modules(simulator)
    assert {m.split(".")[0] for m in imports} <= {"__future__", "dataclasses", "typing", "numpy", "pandas"}, imports
    calls = {n.func.attr for n in ast.walk(ast.parse(pathlib.Path(simulator.__file__).read_text()))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
             and n.func.value.id == "app"}
    assert calls == {"emit", "ask"}


@pytest.mark.slow
def test_short_coda_demo_end_to_end(tmp_path):
    users, days = 6, 3
    exp = Experiment(Config(users=users, days=days, out_dir=str(tmp_path / "out"), workers=2))
    res = exp.run()
    seed = res["seeds"]["0"]
    for arm in ("cloud", "calibration", "local", "coda"):
        m = seed[arm]
        assert m["test_samples"] > 0 and 0.0 < m["pooled_auc"] < 1.0 and m["pooled_logloss"] > 0
        assert 0 < m["users_with_auc"] <= users and 0 < m["users_with_click"] <= users
        for k in (5, 10):
            assert 0.0 <= m[f"ndcg@{k}"] <= m[f"hr@{k}"] <= 1.0
        assert len(seed["per_user"][arm]["auc"]) == len(seed["per_user"]["users"])
    # a constant per-user offset ranks like Cloud: same per-user AUC and HR, other probabilities
    assert seed["per_user"]["calibration"]["auc"] == seed["per_user"]["cloud"]["auc"]
    assert seed["calibration"]["hr@10"] == seed["cloud"]["hr@10"]
    assert seed["calibration"]["pooled_logloss"] != seed["cloud"]["pooled_logloss"]
    assert seed["cloud_day"] == days + 1  # the pipeline closed every day: the cloud's own clock moved
    # the cloud retrained the global model every day on all days so far; the devices restarted from each
    gm = seed["global_models"]
    assert [g["version"] for g in gm] == ["v1", "v2", "v3"] and [g["days"] for g in gm] == [[1, 1], [1, 2], [1, 3]]
    assert gm[0]["n_train"] < gm[1]["n_train"] < gm[2]["n_train"]
    diag = seed["diagnostics"]
    for arm in ("ctr", "ctr_local"):
        assert diag[arm]["devices_on_the_last_global"] == diag[arm]["devices_trained"] == users, diag[arm]
        assert diag[arm]["restarts_from_a_new_global"] >= users  # at least the last morning's
    cost = seed["cost"]
    assert cost["task_runs"] >= users * (days - 1) and cost["task_runs_failed"] == 0, cost["first_failure"]
    assert cost["batches_pulled"] > 0 and 0 < cost["kb_per_trigger"] < 64
    assert diag["home_pages"] == users * (days - 1) and len(diag["example_home_page_top5"]) == 5
    assert diag["served_from"] == {"M": users * (days - 1)}
    assert 0 < diag["filter_kept"] <= diag["filter_scored"]
    assert diag["ctr"]["train_runs"] >= users and diag["ctr_local"]["train_runs"] >= users  # local_arm by --set
    stats = seed["release_stats"]
    for task in ("coda_samples", "coda_fetch", "coda_filter", "coda_train", "coda_infer"):
        assert stats[task]["delivered"] == users and stats[task]["failed"] == 0, (task, stats[task])
    # every device made its own samples every day and asked for its own batches every morning
    assert stats["coda_samples"]["ran"] == users and stats["coda_samples"]["runs"] >= users * days
    assert stats["coda_fetch"]["runs"] >= users * (days - 1)
    # a home page each morning plus one evaluation page (both device arms in one ask), all answered by the devices
    assert stats["coda_infer"]["runs"] == users * (days - 1) + users
    out = json.loads((tmp_path / "out" / "results.json").read_text())
    assert out["summary"]["coda"]["pooled_auc"]["mean"] == pytest.approx(seed["coda"]["pooled_auc"])
    for pair in ("coda-cloud", "coda-local", "coda-calibration", "local-cloud"):
        for metric in ("auc", "hr@10", "ndcg@10", "hr@5", "ndcg@5", "logloss"):
            c = out["paired"][pair][metric]
            assert c["lo"] <= c["mean"] <= c["hi"] and c["seeds"] == 1 and c["users"] > 0, (pair, metric, c)
    assert out["evaluation"]["negatives"] > 0 and out["seeds"]["0"]["phase_seconds"]
    assert (tmp_path / "out" / "results.png").stat().st_size > 5_000
    # held-out interactions were never emitted: the devices saw only the training days
    assert out["split"]["test_rows"] > 0 and out["split"]["days"] == days
    # the same seed gives the same numbers (the pseudonym key comes from the seed; everything else is seeded)
    again = Experiment(Config(users=users, days=days, out_dir=str(tmp_path / "again"), workers=2)).run()
    for arm in ("cloud", "calibration", "local", "coda"):
        assert again["seeds"]["0"][arm] == seed[arm], arm
    assert again["paired"] == res["paired"]
    assert [g["digest"] for g in again["seeds"]["0"]["global_models"]] == [g["digest"] for g in gm]


def test_demo_part_one_over_tls():
    res = CliRunner().invoke(main, ["demo", "--skip-coda"])
    assert res.exit_code == 0, res.output
    assert "platform serving TLS" in res.output
    lines = [line for line in res.output.splitlines() if "phone-" in line]
    assert any("phone-alice" in line and "hello@" in line for line in lines)
    assert any("phone-bob" in line and "(nothing)" in line for line in lines)
