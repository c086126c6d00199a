"""MovieLens-100k as a replay of device behaviour logs.

The data ship inside the `recbole==1.2.1` wheel (installed with --no-deps). We only read its data
files: importing `recbole` would pull in torch. The licence forbids redistribution, so nothing here
copies the files anywhere.

Each MovieLens user plays one device. Ratings are the behaviour log (event "rate", value = rating),
and a rating >= 4 counts as a click. `assign_days` turns each user's time-ordered ratings into a
daily upload schedule for the demo and holds out the user's last 10% as a test set.
"""
from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from walle.platform.errors import FailedPrecondition, InvalidArgument, NotFound
from walle.protos.coda_pb2 import BehaviorLog

INSTALL_HINT = "pip install --no-deps recbole==1.2.1"
CLICK_THRESHOLD = 4.0

# Genre id = position + 1; 0 is kept for padding / "no category".
GENRES: tuple[str, ...] = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
    "Western", "unknown",
)
GENRE_ID = {g: i + 1 for i, g in enumerate(GENRES)}


def dataset_dir() -> Path:
    """Folder of the ml-100k files inside the installed recbole wheel (recbole is not imported)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FailedPrecondition(f"MovieLens-100k needs the recbole wheel: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    if not (path / "ml-100k.inter").is_file():
        raise FailedPrecondition(f"{path} has no ml-100k.inter; reinstall: {INSTALL_HINT}")
    return path


def _read(name: str) -> pd.DataFrame:
    # Headers look like "user_id:token": keep the part before the colon.
    df = pd.read_csv(dataset_dir() / name, sep="\t", dtype=str, keep_default_na=False)
    df.columns = [c.split(":", 1)[0] for c in df.columns]
    return df


@dataclass(frozen=True)
class MovieLens:
    inter: pd.DataFrame  # user_id int64, item_id int64, rating float64, ts int64, label int8
    items: pd.DataFrame  # item_id int64, title str, release_year Int64, genres list[str], genre_ids list[int]
    users: pd.DataFrame  # user_id int64, age int64, gender str, occupation str, zip_code str


@functools.lru_cache(maxsize=1)
def _load_cached() -> MovieLens:
    inter = _read("ml-100k.inter")
    inter = pd.DataFrame({
        "user_id": inter["user_id"].astype("int64"),
        "item_id": inter["item_id"].astype("int64"),
        "rating": inter["rating"].astype("float64"),
        "ts": inter["timestamp"].astype("float64").astype("int64"),
    })
    inter["label"] = (inter["rating"] >= CLICK_THRESHOLD).astype("int8")

    items = _read("ml-100k.item")
    genres = items["class"].str.split()
    items = pd.DataFrame({
        "item_id": items["item_id"].astype("int64"),
        "title": items["movie_title"],
        "release_year": pd.to_numeric(items["release_year"], errors="coerce").astype("Int64"),
        "genres": genres,
        "genre_ids": genres.map(lambda gs: [GENRE_ID[g] for g in gs]),
    })

    users = _read("ml-100k.user")
    users = pd.DataFrame({
        "user_id": users["user_id"].astype("int64"),
        "age": users["age"].astype("int64"),
        "gender": users["gender"],
        "occupation": users["occupation"],
        "zip_code": users["zip_code"],
    })
    return MovieLens(inter, items, users)


def load() -> MovieLens:
    """Load the three tables (~0.05 s the first time). Callers get copies they may modify."""
    ml = _load_cached()
    return MovieLens(ml.inter.copy(), ml.items.copy(), ml.users.copy())


def device_id(user_id: int) -> str:
    """The simulated device of a MovieLens user (one device per user)."""
    return f"ml100k-{int(user_id)}"


def assign_days(inter: pd.DataFrame, n_days: int, *, test_frac: float = 0.1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split each user's ratings into a daily upload schedule and a held-out test tail.

    Per user, ratings are ordered by (ts, item_id) (ties on ts are common, so item_id makes the
    order deterministic) and numbered `seq` 0..n-1: the device's upload sequence number.
    The last ceil(test_frac * n) ratings are TEST: never uploaded, never trained on or matched.
    The remaining m ratings are spread over days 1..n_days by their rank quantile,
    day = 1 + floor(rank * n_days / m), so every user uploads a similar slice every day (a user
    with fewer than n_days training ratings skips some days) and days follow time order.

    Returns (train, test): both keep the input columns plus `seq`; train also has `day`.
    """
    if n_days < 1:
        raise InvalidArgument(f"n_days must be >= 1, got {n_days}")
    if not 0.0 <= test_frac < 1.0:
        raise InvalidArgument(f"test_frac must be in [0, 1), got {test_frac}")
    missing = {"user_id", "item_id", "ts"} - set(inter.columns)
    if missing:
        raise InvalidArgument(f"inter lacks columns {sorted(missing)}")
    df = inter.sort_values(["user_id", "ts", "item_id"], kind="stable").reset_index(drop=True)
    df["seq"] = df.groupby("user_id").cumcount().astype("int64")
    n = df.groupby("user_id")["seq"].transform("size").to_numpy()
    n_test = np.ceil(n * test_frac).astype("int64")
    n_train = n - n_test
    is_test = df["seq"].to_numpy() >= n_train
    test = df[is_test].reset_index(drop=True)
    train = df[~is_test].reset_index(drop=True)
    rank = train["seq"].to_numpy()
    m = n_train[~is_test]
    train["day"] = (1 + (rank * n_days) // m).astype("int64")
    return train, test


def replay_logs(train: pd.DataFrame, user_id: int, day: int) -> list[tuple[int, BehaviorLog]]:
    """What user `user_id`'s device uploads on `day`: (seq, BehaviorLog) pairs in time order,
    ready for RawLogStore.add. `train` is the first result of assign_days."""
    rows = train[(train["user_id"] == user_id) & (train["day"] == day)]
    if rows.empty and not (train["user_id"] == user_id).any():
        raise NotFound(f"user_id {user_id} is not in the replay table")
    return [
        (int(r.seq), BehaviorLog(ts=int(r.ts), item_id=int(r.item_id), event="rate", value=float(r.rating)))
        for r in rows.itertuples(index=False)
    ]


def split_stats(train: pd.DataFrame, test: pd.DataFrame) -> dict[str, float]:
    """Small summary of a split, for logs and reports."""
    return {
        "train_rows": float(len(train)),
        "test_rows": float(len(test)),
        "users": float(train["user_id"].nunique()),
        "days": float(train["day"].max()) if len(train) else 0.0,
        "train_click_rate": float(train["label"].mean()) if "label" in train and len(train) else math.nan,
        "test_click_rate": float(test["label"].mean()) if "label" in test and len(test) else math.nan,
    }


def as_raw_frame(train: pd.DataFrame) -> pd.DataFrame:
    """The replay table in the raw behaviour table's shape (RawLogStore.frame columns), i.e. what
    the cloud holds once every device uploaded these rows; handy for tests and offline runs."""
    return pd.DataFrame({
        "device_id": train["user_id"].map(device_id).astype(object),
        "user_id": train["user_id"].astype(str).astype(object),
        "seq": train["seq"].astype("int64"),
        "day": train["day"].astype("int64") if "day" in train else 0,
        "ts": train["ts"].astype("int64"),
        "item_id": train["item_id"].astype("int64"),
        "event": "rate",
        "value": train["rating"].astype("float64"),
    })
