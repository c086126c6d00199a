"""Guarded rollouts: a release may carry health guards (a failure-rate ceiling once it has enough
runs, a p99 duration ceiling). The platform checks them as device run reports arrive and, when one
trips, pauses the release or rolls it back (as the operator chose), and audits it with the figures.

`GuardRPCs` is mixed into `Platform` (SetReleaseGuard / GetReleaseGuard are AdminService RPCs);
`check_guards` is called after run reports are stored."""
from __future__ import annotations

import json
import logging
import time

from walle.protos import admin_pb2

from .errors import FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger("walle.platform.guards")

ON_TRIP = ("pause", "rollback")
GUARD_ACTOR = "guard"
_COLUMNS = ("release_id", "max_failure_rate", "min_runs", "max_p99_seconds", "on_trip", "actor", "status",
            "trip_detail", "tripped_at", "action_release_id")


def _ensure_table(state) -> None:
    with state.transaction() as db:
        db.execute("""CREATE TABLE IF NOT EXISTS release_guards (
            release_id TEXT PRIMARY KEY, max_failure_rate REAL NOT NULL, min_runs INTEGER NOT NULL,
            max_p99_seconds REAL NOT NULL, on_trip TEXT NOT NULL, actor TEXT NOT NULL, status TEXT NOT NULL,
            trip_detail TEXT NOT NULL DEFAULT '', tripped_at INTEGER NOT NULL DEFAULT 0,
            action_release_id TEXT NOT NULL DEFAULT '', created_at INTEGER NOT NULL)""")
        # Guards judge a release after every batch of its reports: index-only counts and percentiles.
        db.execute("CREATE INDEX IF NOT EXISTS run_reports_release_status ON run_reports(release_id, status)")
        db.execute("CREATE INDEX IF NOT EXISTS run_reports_release_duration ON run_reports(release_id, duration_s)")


def health_figures(db, release_id: str, p99: bool = True) -> dict:
    """Runs, failures, failure rate and (when asked) p99 duration of a release, from its devices'
    run reports."""
    runs, failed = db.execute("SELECT COUNT(*), COALESCE(SUM(status != 'ok'), 0) FROM run_reports "
                              "WHERE release_id = ?", [release_id]).fetchone()
    want_p99, p99 = p99, 0.0
    if runs and want_p99:
        offset = min(runs - 1, int(0.99 * runs))
        p99 = db.execute("SELECT duration_s FROM run_reports WHERE release_id = ? ORDER BY duration_s "
                         "LIMIT 1 OFFSET ?", [release_id, offset]).fetchone()[0]
    return {"runs": runs, "failed": failed, "failure_rate": failed / runs if runs else 0.0, "p99_seconds": p99}


def guard_states(state) -> dict[str, str]:
    """release id -> "watching" | "tripped" for every guarded release (for lists of releases)."""
    if not state.db["release_guards"].exists():  # no guard yet: do not write on a read path
        return {}
    return dict(state.db.execute("SELECT release_id, status FROM release_guards").fetchall())


def tripped_by(guard: dict, fig: dict) -> str:
    """Why a guard trips on these figures ("" if it holds). Nothing is judged before min_runs."""
    if fig["runs"] < max(1, guard["min_runs"]):
        return ""
    if guard["max_failure_rate"] > 0 and fig["failure_rate"] > guard["max_failure_rate"]:
        return (f"failure rate {fig['failure_rate']:.1%} ({fig['failed']}/{fig['runs']} runs) > "
                f"{guard['max_failure_rate']:.1%}")
    if guard["max_p99_seconds"] > 0 and fig["p99_seconds"] > guard["max_p99_seconds"]:
        return f"p99 duration {fig['p99_seconds']:.3f}s > {guard['max_p99_seconds']:g}s over {fig['runs']} runs"
    return ""


def _to_proto(row: dict) -> admin_pb2.ReleaseGuard:
    return admin_pb2.ReleaseGuard(**{k: row[k] for k in _COLUMNS})


class GuardRPCs:
    """Needs `self.state` and `self.releases` (a Platform)."""

    _guards_ready = False

    def _guard_table(self):
        """Create the guard table (and its indexes) on first use of a guard."""
        if not self._guards_ready:
            _ensure_table(self.state)
            self._guards_ready = True
        return self.state

    def _any_guards(self) -> bool:
        # read path: no table yet means no guard (another process may create it at any time)
        return self._guards_ready or self.state.db["release_guards"].exists()

    def SetReleaseGuard(self, req: admin_pb2.ReleaseGuard) -> admin_pb2.ReleaseGuard:
        rel = self.releases.get(req.release_id)  # NotFound
        if rel["state"] == "revoked":
            raise FailedPrecondition(f"release {req.release_id} is revoked; only a live release can be guarded")
        if not 0 <= req.max_failure_rate < 1:
            raise InvalidArgument(f"max failure rate must be within 0..100% (got {req.max_failure_rate:.1%})")
        if req.max_p99_seconds < 0 or req.min_runs < 0:
            raise InvalidArgument("max p99 seconds and min runs cannot be negative")
        if not req.max_failure_rate and not req.max_p99_seconds:
            raise InvalidArgument("a guard needs --max-failure-rate or --max-p99-seconds")
        on_trip = req.on_trip or "pause"
        if on_trip not in ON_TRIP:
            raise InvalidArgument(f"on-trip must be one of {', '.join(ON_TRIP)} (got {on_trip!r})")
        row = {"release_id": rel["id"], "max_failure_rate": req.max_failure_rate, "min_runs": req.min_runs or 1,
               "max_p99_seconds": req.max_p99_seconds, "on_trip": on_trip, "actor": req.actor or "operator",
               "status": "watching", "trip_detail": "", "tripped_at": 0, "action_release_id": "",
               "created_at": int(time.time())}
        state = self._guard_table()
        with state.transaction() as db:
            db["release_guards"].insert(row, replace=True)
            state.audit(db, row["actor"], "release.guard", rel["id"],
                        {k: row[k] for k in ("max_failure_rate", "min_runs", "max_p99_seconds", "on_trip")})
        self.check_guards([rel["id"]])  # reports may already be in
        return self.GetReleaseGuard(admin_pb2.ReleaseRef(id=rel["id"]))

    def GetReleaseGuard(self, req: admin_pb2.ReleaseRef) -> admin_pb2.ReleaseGuard:
        rows = self.state.db.execute_returning_dicts("SELECT * FROM release_guards WHERE release_id = ?",
                                                     [req.id]) if self._any_guards() else []
        if not rows:
            self.releases.get(req.id)  # NotFound for an unknown release
            raise NotFound(f"release {req.id} has no guard")
        return _to_proto(rows[0])

    def check_guards(self, release_ids) -> list[str]:
        """Judge the watching guards of these releases; trip those whose figures break them. Returns
        the ids of the releases that tripped."""
        ids = sorted({r for r in release_ids if r})
        if not ids or not self._any_guards():
            return []
        state = self.state
        marks = ",".join("?" * len(ids))
        guards = state.db.execute_returning_dicts(
            f"SELECT * FROM release_guards WHERE status = 'watching' AND release_id IN ({marks})", ids)
        tripped = []
        for guard in guards:
            fig = health_figures(state.db, guard["release_id"], p99=guard["max_p99_seconds"] > 0)
            why = tripped_by(guard, fig)
            if why and self._trip(guard, fig, why):
                tripped.append(guard["release_id"])
        return tripped

    def after_run_reports(self, release_ids) -> None:
        """Called once stored run reports are committed: a failing check never fails the upload."""
        try:
            self.check_guards(release_ids)
        except Exception:
            log.exception("checking release guards failed")

    def _trip(self, guard: dict, fig: dict, why: str) -> bool:
        rid = guard["release_id"]
        state = self.state
        detail = {"reason": why, "on_trip": guard["on_trip"], **fig}
        with state.transaction() as db:
            claimed = db.execute("UPDATE release_guards SET status = 'tripped', trip_detail = ?, tripped_at = ? "
                                 "WHERE release_id = ? AND status = 'watching'",
                                 [json.dumps(detail, sort_keys=True), int(time.time()), rid]).rowcount
            if claimed:
                state.audit(db, GUARD_ACTOR, "release.guard_trip", rid, detail)
        if not claimed:
            return False  # another server thread judged it first
        rel = self.releases.get(rid)
        action = ""
        try:
            if guard["on_trip"] == "rollback":
                action = self.releases.rollback(rel["task"], channel=rel["channel"], actor=GUARD_ACTOR)["id"]
            elif rel["state"] in ("active", "fallback"):
                self.releases.pause(rid, actor=GUARD_ACTOR)
        except (FailedPrecondition, NotFound) as e:
            # e.g. nothing earlier to roll back to: pause instead, and say so in the guard's record
            log.warning("guard on %s tripped (%s) but %s failed: %s; pausing", rid, why, guard["on_trip"], e.message)
            detail["action_error"] = e.message
            if self.releases.get(rid)["state"] in ("active", "fallback"):
                self.releases.pause(rid, actor=GUARD_ACTOR)
        with state.transaction() as db:
            db.execute("UPDATE release_guards SET action_release_id = ?, trip_detail = ? WHERE release_id = ?",
                       [action, json.dumps(detail, sort_keys=True), rid])
        log.warning("guard tripped on release %s: %s -> %s", rid, why,
                    f"rolled back as {action}" if action else "paused")
        return True
