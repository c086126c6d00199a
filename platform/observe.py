"""What devices did and why, for operators: run reports with the task's log lines and errors, a
release's convergence (targeted / delivered / ran / failed / rejected) with its top errors, one
device's view, the audit trail with filters, the operators.

`Observe` is mixed into `Platform`, so each method is an AdminService RPC (local and remote alike).
Everything here only reads the platform state."""
from __future__ import annotations

import json
import time

from walle.protos import admin_pb2

from .errors import InvalidArgument, NotFound
from .releases import HITS, ReleaseManager, release_to_proto
from .rules import parse_version

DEFAULT_LIMIT = 100
MAX_LIMIT = 5000
TOP_ERRORS = 5
LOG_LOOKAHEAD = 4  # a run's log lines are the next "log" record(s) its device sent after the report


def first_line(error: str) -> str:
    """"Type: message" of an error text (the task's traceback follows on the next lines)."""
    return (error or "").strip().splitlines()[0] if (error or "").strip() else ""


def _cursor(text: str) -> int:
    if not text:
        return 0
    try:
        return int(text)
    except ValueError:
        raise InvalidArgument(f"log cursor {text!r} is not one this platform returned") from None


def _run_entry(row: dict) -> admin_pb2.LogEntry:
    return admin_pb2.LogEntry(ts=row["ts"], device_id=row["device_id"], kind="run", task=row["task"],
                              version=row["version"], release_id=row["release_id"], status=row["status"],
                              duration_s=row["duration_s"], error=row["error"], trigger=row["trigger"],
                              peak_memory_kb=row["peak_memory_kb"])


def _action_match() -> str:
    # an exact action, or a family when the pattern ends in "." ("release." = release.create, ...)
    return "(action = ? OR (substr(?, -1) = '.' AND substr(action, 1, length(?)) = ?))"


def _action_args(pattern: str) -> list[str]:
    return [pattern, pattern, pattern, pattern]


class Observe:
    """AdminService RPCs that read reports; needs `self.state`, `self.releases`, `self.credentials`."""

    # -- logs -----------------------------------------------------------------------------------
    def GetLogs(self, req: admin_pb2.LogRequest) -> admin_pb2.LogReply:
        limit = min(req.limit or DEFAULT_LIMIT, MAX_LIMIT)
        if req.limit < 0:
            raise InvalidArgument("--limit must be positive")
        sql, args = "SELECT rowid, * FROM run_reports WHERE rowid > ?", [_cursor(req.after)]
        for column, value in (("release_id", req.release_id), ("task", req.task), ("device_id", req.device_id)):
            if value:
                sql += f" AND {column} = ?"
                args.append(value)
        if req.status == "failed":
            sql += " AND status != 'ok'"
        elif req.status:
            sql += " AND status = ?"
            args.append(req.status)
        if req.since:
            sql += " AND ts >= ?"
            args.append(req.since)
        sql += " ORDER BY rowid DESC LIMIT ?"
        rows = self.state.db.execute_returning_dicts(sql, args + [limit])
        entries = [_run_entry(r) for r in rows]
        for entry, row in zip(entries, rows):
            entry.lines.extend(self._log_lines(row["device_id"], row["seq"], row["task"]))
        cursor = str(max((r["rowid"] for r in rows), default=_cursor(req.after)))
        return admin_pb2.LogReply(entries=entries, cursor=cursor)

    def _log_lines(self, device_id: str, seq: int, task: str) -> list[str]:
        for (payload,) in self.state.db.execute(
                "SELECT payload FROM events WHERE device_id = ? AND topic = 'log' AND seq > ? AND seq <= ? "
                "ORDER BY seq", [device_id, seq, seq + LOG_LOOKAHEAD]):
            try:
                record = json.loads(payload)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("task") == task:
                return [str(line) for line in record.get("lines") or []]
        return []

    # -- a release ------------------------------------------------------------------------------
    def GetReleaseHealth(self, req: admin_pb2.ReleaseRef) -> admin_pb2.ReleaseHealth:
        row = self.releases.get(req.id)
        db = self.state.db
        out = admin_pb2.ReleaseHealth(release=release_to_proto(row, self.state.release_stats(row["id"])))
        out.targeted = self._targeted(row)
        out.failed_devices = db.execute("SELECT COUNT(DISTINCT device_id) FROM run_reports WHERE release_id = ? "
                                        "AND status != 'ok'", [row["id"]]).fetchone()[0]
        groups: dict[str, dict] = {}
        for device_id, error, status in db.execute(
                "SELECT device_id, error, status FROM run_reports WHERE release_id = ? AND status != 'ok' "
                "ORDER BY rowid DESC LIMIT 20000", [row["id"]]):
            key = first_line(error) or status
            g = groups.setdefault(key, {"runs": 0, "devices": set(), "example": error or status,
                                        "example_device": device_id})
            g["runs"] += 1
            g["devices"].add(device_id)
        for key, g in sorted(groups.items(), key=lambda kv: -kv[1]["runs"])[:TOP_ERRORS]:
            out.top_errors.add(error=key, runs=g["runs"], devices=len(g["devices"]), example=g["example"],
                               example_device=g["example_device"])
        durations = [d for (d,) in db.execute("SELECT duration_s FROM run_reports WHERE release_id = ? "
                                              "ORDER BY duration_s", [row["id"]])]
        if durations:
            out.p99_duration_s = durations[min(len(durations) - 1, int(0.99 * len(durations)))]
        for change in self.state.release_log(row["id"]):
            out.changes.append(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(change['ts']))} "
                               f"{change['actor']}: {change['change']}")
        return out

    def _targeted(self, row: dict) -> int:
        """Enrolled, unrevoked devices whose last-reported attributes are in this release's audience
        (whether or not the release is paused or a fallback)."""
        self.flush_seen()
        compiled = self.releases._compile(dict(row, state="active"))
        n = 0
        for (attrs_json,) in self.state.db.execute("SELECT attrs FROM devices WHERE revoked = 0 AND attrs != '{}'"):
            attrs = json.loads(attrs_json)
            if attrs.get("channel", "stable") != row["channel"]:
                continue
            ids = {x for x in (attrs.get("user_id"), attrs.get("device_id")) if x}
            unit = attrs.get("user_id") or attrs.get("device_id") or ""
            host = parse_version(attrs["host_version"]) if attrs.get("host_version") else None
            n += ReleaseManager._decide(compiled, attrs, ids, unit, host) in HITS
        return n

    # -- a device -------------------------------------------------------------------------------
    def GetDevice(self, req: admin_pb2.DeviceRef) -> admin_pb2.DeviceDetail:
        self.flush_seen()
        rows = self.state.db.execute_returning_dicts("SELECT * FROM devices WHERE device_id = ?", [req.device_id])
        if not rows:
            raise NotFound(f"unknown device {req.device_id!r}")
        d = rows[0]
        out = admin_pb2.DeviceDetail(device=admin_pb2.Device(
            device_id=d["device_id"], enrolled_at=d["enrolled_at"], revoked=bool(d["revoked"]),
            last_seen=d["last_seen"], app_version=d["app_version"], attrs_json=d["attrs"]))
        out.user_id = self.device_user(req.device_id)
        for r in self.state.db.execute_returning_dicts(
                """SELECT task, version, release_id, status, ts, error FROM deliveries d
                   WHERE device_id = ? AND seq = (SELECT MAX(seq) FROM deliveries
                                                  WHERE device_id = d.device_id AND task = d.task)
                   ORDER BY task""", [req.device_id]):
            out.installed.add(**r)
        out.last_runs.extend(self.GetLogs(admin_pb2.LogRequest(device_id=req.device_id, limit=10)).entries)
        out.errors.extend(self.GetLogs(admin_pb2.LogRequest(device_id=req.device_id, status="failed",
                                                            limit=10)).entries)
        return out

    # -- audit and operators --------------------------------------------------------------------
    def GetAudit(self, req: admin_pb2.AuditRequest) -> admin_pb2.AuditLog:
        limit = min(req.limit if req.limit > 0 else DEFAULT_LIMIT, MAX_LIMIT)
        sql, args = "SELECT ts, actor, action, target, detail FROM audit WHERE 1=1", []
        if req.action:
            sql += " AND " + _action_match()
            args += _action_args(req.action)
        for excluded in req.exclude_action:
            sql += " AND NOT " + _action_match()
            args += _action_args(excluded)
        for column, value in (("actor", req.actor), ("target", req.target)):
            if value:
                sql += f" AND {column} = ?"
                args.append(value)
        if req.since:
            sql += " AND ts >= ?"
            args.append(req.since)
        rows = self.state.db.execute_returning_dicts(sql + " ORDER BY id DESC LIMIT ?", args + [limit])
        return admin_pb2.AuditLog(entries=[admin_pb2.AuditEntry(**e) for e in rows])

    def ListOperators(self, req: admin_pb2.Empty | None = None) -> admin_pb2.OperatorList:
        rows = self.state.db.execute_returning_dicts("SELECT name, created_at, revoked FROM operators ORDER BY name")
        return admin_pb2.OperatorList(operators=[admin_pb2.OperatorInfo(name=r["name"], created_at=r["created_at"],
                                                                        revoked=bool(r["revoked"])) for r in rows])
