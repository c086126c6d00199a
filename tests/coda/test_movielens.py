"""MovieLens-100k replay: loading from the recbole wheel, the per-user day schedule, replay logs."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from walle.platform.coda import movielens as ml
from walle.platform.errors import FailedPrecondition, InvalidArgument, NotFound
from walle.protos.coda_pb2 import BehaviorLog


@pytest.fixture(scope="module")
def data():
    return ml.load()


def test_load_tables_have_clean_columns_and_known_sizes(data):
    assert list(data.inter.columns) == ["user_id", "item_id", "rating", "ts", "label"]
    assert len(data.inter) == 100_000
    assert data.inter["user_id"].nunique() == 943
    assert data.inter["item_id"].nunique() == 1682
    assert set(data.inter["rating"].unique()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    np.testing.assert_array_equal(data.inter["label"], (data.inter["rating"] >= 4).astype("int8"))
    assert {"item_id", "title", "genres", "genre_ids"} <= set(data.items.columns)
    assert len(data.items) == 1682
    ids = {g for gs in data.items["genre_ids"] for g in gs}
    assert ids <= set(range(1, len(ml.GENRES) + 1)) and len(ids) == 19
    assert list(data.users.columns) == ["user_id", "age", "gender", "occupation", "zip_code"]
    assert len(data.users) == 943


def test_load_returns_copies(data):
    data.inter.loc[0, "rating"] = 99.0
    assert ml.load().inter["rating"].max() == 5.0


def test_missing_wheel_gives_install_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "recbole" else real(name, *a))
    with pytest.raises(FailedPrecondition, match=r"pip install --no-deps recbole==1\.2\.1"):
        ml.dataset_dir()


def test_assign_days_holds_out_each_users_last_tenth(data):
    train, test = ml.assign_days(data.inter, 7)
    assert len(train) + len(test) == len(data.inter)
    n = data.inter.groupby("user_id").size()
    n_test = test.groupby("user_id").size().reindex(n.index, fill_value=0)
    assert (n_test == np.ceil(n * 0.1)).all()
    # Every test rating comes at or after the user's last training rating.
    last_train = train.groupby("user_id")["ts"].max()
    first_test = test.groupby("user_id")["ts"].min()
    assert (first_test >= last_train.loc[first_test.index]).all()
    assert not set(zip(train.user_id, train.seq)) & set(zip(test.user_id, test.seq))


def test_assign_days_spreads_every_user_over_all_days_in_time_order(data):
    train, _ = ml.assign_days(data.inter, 7)
    assert train["day"].between(1, 7).all()
    per_user = train.groupby("user_id")["day"].nunique()
    assert (per_user == 7).all()  # every user has >= 18 training ratings
    for _, g in train.groupby("user_id"):
        g = g.sort_values("seq")
        assert g["day"].is_monotonic_increasing and g["ts"].is_monotonic_increasing
    # Slices are even: a user's days differ in size by at most one row.
    sizes = train.groupby(["user_id", "day"]).size().groupby("user_id").agg(["min", "max"])
    assert (sizes["max"] - sizes["min"] <= 1).all()


def test_assign_days_rejects_bad_arguments(data):
    with pytest.raises(InvalidArgument, match="n_days"):
        ml.assign_days(data.inter, 0)
    with pytest.raises(InvalidArgument, match="test_frac"):
        ml.assign_days(data.inter, 3, test_frac=1.0)
    with pytest.raises(InvalidArgument, match="ts"):
        ml.assign_days(data.inter.drop(columns=["ts"]), 3)


def test_replay_logs_are_the_users_rows_of_that_day(data):
    train, _ = ml.assign_days(data.inter, 5)
    logs = ml.replay_logs(train, 196, 2)
    rows = train[(train.user_id == 196) & (train.day == 2)].sort_values("seq")
    assert [s for s, _ in logs] == rows["seq"].tolist()
    assert all(isinstance(b, BehaviorLog) and b.event == "rate" for _, b in logs)
    assert [(b.ts, b.item_id, b.value) for _, b in logs] == list(zip(rows.ts, rows.item_id, rows.rating))
    all_days = [s for d in range(1, 6) for s, _ in ml.replay_logs(train, 196, d)]
    assert all_days == sorted(train[train.user_id == 196]["seq"])
    with pytest.raises(NotFound, match="99999"):
        ml.replay_logs(train, 99999, 1)


def test_as_raw_frame_matches_raw_table_columns(data):
    train, _ = ml.assign_days(data.inter, 3)
    raw = ml.as_raw_frame(train)
    assert list(raw.columns) == ["device_id", "user_id", "seq", "day", "ts", "item_id", "event", "value"]
    assert raw["device_id"].nunique() == 943 and (raw["event"] == "rate").all()
    assert not raw.duplicated(["device_id", "seq"]).any()
