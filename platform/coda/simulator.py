"""MovieLens users playing the app (paper 4.4.3): the demo's user simulator.

Each user has one device and talks to it only through the app interface (device_host/app.py): `emit`
an app event and `ask` a task for an answer. An `App` is anything with those two calls: the embedded
`Device`, an `AppClient` on the device's socket, or the demo's fleet adapter.

What a simulated user does:
  - on the first day, the app reports the user's profile (`profile`);
  - each day, the user rates the movies of that day's slice of their history (`rate` events with the
    rating's own time and day), and the app flushes the behaviour log (`flush_behavior`): the device
    builds its local samples and uploads the behaviour (coda_samples);
  - when the app comes to the foreground it asks the device to fetch its matched samples
    (`fetch_samples` -> coda_fetch, again while more can be pulled today), which starts filtering and
    training on the device;
  - it opens the home page: 20 movies it has not rated, ranked by the device (`page_view:home` ->
    coda_infer);
  - at the end, the home page shows the user's held-out movies (never emitted, never uploaded) among
    movies they never rated, and the user "clicks" the held-out ones they rated >= 4: the evaluation
    page, scored by the device's model arms in one ask (evaluation.py defines the page).

This module knows nothing of device storage, models or cloud tables (tests/coda/test_demo_e2e.py
checks its imports): it only emits and asks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd

HOME_PAGE = 20       # candidates on the home page
HIST_LEN = 50        # the history the app sends with a page (the samples' history length)
MAX_FETCHES = 6      # foreground fetches a day at most (12 batches a day, ~8 fit the table at once)


class App(Protocol):
    def emit(self, name: str, payload: Any = None) -> Any: ...

    def ask(self, event: str, payload: Any = None, task: str = "") -> Any: ...


@dataclass
class UserDay:
    """What one user's device reported back to the app on one day."""
    fetches: list = field(default_factory=list)   # coda_fetch results
    home_page: dict | None = None                  # coda_infer's answer for the home page


class Users:
    """The MovieLens replay: each user's training interactions by day (from movielens.assign_days),
    the catalog's categories and the users' profile features."""

    def __init__(self, train: pd.DataFrame, item_cats: dict[int, list[int]], profiles: dict[str, list[float]],
                 item_ids: np.ndarray):
        self.by_user = {int(u): g.sort_values(["ts", "item_id"], kind="stable") for u, g in train.groupby("user_id")}
        self.item_cats, self.profiles, self.item_ids = item_cats, profiles, item_ids

    def behave(self, app: App, uid: int, day: int) -> int:
        """The user's behaviour of `day`, emitted as app events; returns how many ratings."""
        rows = self.by_user[uid]
        if day == 1 and self.profiles.get(str(uid)):
            app.emit("profile", {"values": self.profiles[str(uid)]})
        today = rows[rows["day"] == day]
        for r in today.itertuples(index=False):
            app.emit(getattr(r, "event", "rate"),  # "click" / "view" rows of an implicit log
                     {"item_id": int(r.item_id), "value": float(r.rating), "ts": int(r.ts), "day": day})
        app.emit("flush_behavior")
        return len(today)

    def fetch(self, app: App) -> list[dict]:
        """The app in the foreground: fetch matched samples until nothing more comes today."""
        out = []
        for _ in range(MAX_FETCHES):
            res = app.ask("fetch_samples", task="coda_fetch")
            out.append(res)
            if res.get("exhausted") or not res.get("pulled"):
                break
        return out

    def history(self, uid: int, day: int) -> list[int]:
        """The user's latest HIST_LEN rated items up to and including `day`, oldest first."""
        rows = self.by_user[uid]
        return [int(i) for i in rows[rows["day"] <= day]["item_id"].tail(HIST_LEN)]

    def candidates(self, uid: int, day: int, items: list[int]) -> list[dict]:
        """`items` as home-page candidates in the context of the user's history up to `day`."""
        hist = self.history(uid, day)
        hist_cats = [(self.item_cats.get(h) or [0])[0] for h in hist]  # first category, as samples
        return [{"item_id": int(i), "item_cats": self.item_cats.get(int(i), []), "hist_items": hist,
                 "hist_cats": hist_cats, "profile": self.profiles.get(str(uid), [])} for i in items]

    def home_page(self, app: App, uid: int, day: int) -> dict:
        """20 movies the user has not rated, in the context of their history; the device ranks them."""
        seen = set(self.by_user[uid]["item_id"].astype(int))
        rng = np.random.default_rng(uid * 1000 + day)
        pool = [int(i) for i in rng.choice(self.item_ids, size=3 * HOME_PAGE, replace=False) if int(i) not in seen]
        return app.ask("page_view:home", {"candidates": self.candidates(uid, day, pool[:HOME_PAGE])})

    @staticmethod
    def evaluation_page(app: App, candidates: list[dict], models: list[str]) -> dict[str, list[float]]:
        """The evaluation home page (the held-out exposures and the page's items), scored on the
        device by each of `models` in one ask; returns model -> scores in the candidates' order
        (the caller ranks them and knows the user's clicks)."""
        got = app.ask("page_view:home", {"candidates": candidates, "models": models})
        return {m: [float(x) for x in got["models"][m]["scores"]] for m in models}
