"""Releases: which task version goes to which devices.

Per task and channel, releases form a chain, newest first. A device gets the version of the first
release in the chain whose audience it is in; revoked releases are skipped, and paused ones are
skipped too (devices fall back to the release before, as if it were disabled). The chain's newest
live, unpaused release is 'active'; the older live ones, which devices outside its audience (or
everyone, while it is paused) fall back to, are 'fallback': listed among the active releases and
pausable, resumable and revocable like any release. A rollback revokes the releases of the version
it rolls back, so nothing it replaced can come back when the rollback is paused or revoked. A release's
audience: never a deny-listed id; always an allow-listed id; otherwise (not in beta) the rule must
match and the device's sticky bucket must be under the rollout percentage; and the device host must
be new enough for the task. The same inputs always give the same answer, and `explain` says why.

Release rows are never deleted and their task, version and rule never change; a rollback is a new
release. Every change is recorded in the release log and the audit trail."""
from __future__ import annotations

import json
import re
import secrets
import threading
import time
from dataclasses import dataclass

from walle.protos import admin_pb2, bundle, device_pb2

from . import taskconfig
from .errors import FailedPrecondition, InvalidArgument, NotFound
from .rules import Rule, compile_rule, in_rollout, parse_version
from .state import PlatformState
from .taskrepo import TaskRepository

STAGES = ("beta", "gray", "full")
CHANNEL_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
DEFAULT_CHANNEL = "stable"
MAX_LIST = 10_000

# Verdicts of ReleaseManager._decide (the fixed ones double as their explanation).
PAUSED = "skipped: paused"
DENIED = "miss: deny-listed"
OLD_HOST = "miss: host too old"
ALLOWED = "hit: allow-listed"
BETA_ONLY = "miss: beta release and not allow-listed"
RULE_FALSE = "miss: rule is false"
NO_UNIT = "miss: no user_id or device_id to place in the rollout"
OUTSIDE_ROLLOUT = "miss: outside the rollout"
MATCHED = "hit"
HITS = frozenset({ALLOWED, MATCHED})


def device_attrs(info: device_pb2.DeviceInfo) -> dict:
    """The attributes hit rules see; empty strings are absent."""
    attrs = {k: getattr(info, k) for k in ("user_id", "device_id", "app_version", "os", "os_version",
                                           "device_model", "region", "network", "host_version")}
    attrs = {k: v for k, v in attrs.items() if v}
    attrs["tags"] = list(info.tags)
    attrs["channel"] = info.channel or DEFAULT_CHANNEL
    return attrs


MAX_DEVICE_INFO_BYTES = 16 * 1024
MAX_ATTR_CHARS = 256
MAX_TAGS = 64
MAX_INSTALLED = 256
TAG_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_STR_FIELDS = tuple(f.name for f in device_pb2.DeviceInfo.DESCRIPTOR.fields
                    if f.type == f.TYPE_STRING and not f.is_repeated)


def check_device_info(info: device_pb2.DeviceInfo, size: int) -> None:
    """Refuse a DeviceInfo that is too big, carries fields this platform does not know, or has an
    attribute out of bounds; `size` is its serialized size."""
    for name in _STR_FIELDS:
        if len(getattr(info, name)) > MAX_ATTR_CHARS:
            raise InvalidArgument(f"DeviceInfo attribute {name!r} is {len(getattr(info, name))} characters; "
                                  f"at most {MAX_ATTR_CHARS}")
    if len(info.tags) > MAX_TAGS:
        raise InvalidArgument(f"DeviceInfo has {len(info.tags)} tags; at most {MAX_TAGS}")
    for t in info.tags:
        if not TAG_RE.match(t):
            raise InvalidArgument(f"DeviceInfo tag {t[:80]!r} is invalid: 1-64 letters, digits, '_', '.', ':' or '-'")
    if len(info.installed) > MAX_INSTALLED:
        raise InvalidArgument(f"DeviceInfo lists {len(info.installed)} installed tasks; at most {MAX_INSTALLED}")
    for ref in info.installed:
        if len(ref) > MAX_ATTR_CHARS:
            raise InvalidArgument(f"DeviceInfo installed entry {ref[:80]!r}... is longer than {MAX_ATTR_CHARS} characters")
    if info.channel and not CHANNEL_RE.match(info.channel):
        raise InvalidArgument(f"DeviceInfo channel {info.channel!r} is invalid: lower-case letters, digits, '_' or '-'")
    if size > MAX_DEVICE_INFO_BYTES:
        raise InvalidArgument(f"DeviceInfo is {size} bytes; at most {MAX_DEVICE_INFO_BYTES}")
    known = info.ByteSize()
    info.DiscardUnknownFields()
    if info.ByteSize() != known:
        raise InvalidArgument("DeviceInfo carries fields this platform does not know; known attributes: "
                              + ", ".join(f.name for f in device_pb2.DeviceInfo.DESCRIPTOR.fields))


def info_from_attrs(attrs: dict) -> device_pb2.DeviceInfo:
    """The DeviceInfo a stored attribute dict (device_attrs) was made from (installed aside)."""
    info = device_pb2.DeviceInfo(tags=[t for t in attrs.get("tags", []) if isinstance(t, str)])
    for name in _STR_FIELDS:
        if isinstance(attrs.get(name), str):
            setattr(info, name, attrs[name])
    return info


@dataclass
class _Compiled:
    row: dict
    rule: Rule
    allow: frozenset
    deny: frozenset
    min_host: object  # parsed Version or None
    task_pb: device_pb2.ActiveTask


class ReleaseManager:
    def __init__(self, state: PlatformState, repo: TaskRepository, signer=None):
        self.state = state
        self.repo = repo
        self.signer = signer  # callable(digest: str) -> bytes, or None for unsigned bundles
        self._chains: dict[tuple[str, str], list[_Compiled]] = {}
        self._chains_rev = -1
        self._lock = threading.Lock()

    # -- operator actions -----------------------------------------------------------------------
    def create(self, task: str, version: str = "", *, rule: str = "", rollout: float | None = None,
               stage: str = "", channel: str = "", allow=(), deny=(), actor: str = "operator",
               note: str = "", config: dict | None = None) -> dict:
        """`config`: overrides of the task's [config] defaults (text as typed after --set, or typed values)."""
        with self.state.transaction() as db:
            rid = self._create_in(db, task, version, rule=rule, rollout=rollout, stage=stage, channel=channel,
                                  allow=allow, deny=deny, actor=actor, note=note, config=config)
        return self.get(rid)

    def _create_in(self, db, task: str, version: str, *, rule: str, rollout: float | None, stage: str,
                   channel: str, allow, deny, actor: str, note: str, action: str = "release.create",
                   config: dict | None = None) -> str:
        """Insert a release inside the caller's write transaction; returns its id."""
        tv = self.repo.get(task, version)  # NotFound for an unknown task or version
        resolved = taskconfig.resolve(tv.manifest.config, config, f"config of {task}@{tv.version[:12]}")
        compile_rule(rule)  # RuleError (InvalidArgument) with the position of a syntax error
        channel = channel or DEFAULT_CHANNEL
        if not CHANNEL_RE.match(channel):
            raise InvalidArgument(f"channel {channel!r} is invalid: lower-case letters, digits, '_' or '-', up to 32")
        allow, deny = self._id_list("allow", allow), self._id_list("deny", deny)
        stage = stage or ("beta" if allow and rollout is None else
                          "gray" if rollout is not None and rollout < 100 else "full")
        if stage not in STAGES:
            raise InvalidArgument(f"stage must be one of {', '.join(STAGES)} (got {stage!r})")
        if rollout is None:
            rollout = 0.0 if stage == "beta" else 100.0 if stage == "full" else 10.0
        rollout = self._check_rollout(rollout)
        if stage == "beta" and not allow:
            raise InvalidArgument("a beta release needs an allow-list (--allow ID,...): only those devices receive it")
        if stage == "full" and rollout != 100:
            raise InvalidArgument(f"a full release goes to 100% of its audience (got --rollout {rollout:g}); use --stage gray")
        if stage == "gray" and rollout >= 100:
            raise InvalidArgument("a gray release needs a rollout below 100%; use --stage full for everyone")
        # Inside the transaction: a submit confirms (or takes back) its commit in this database, so
        # a version still unconfirmed, or already taken back, can never be released.
        if self.repo.pending_version(task, tv.version):
            raise FailedPrecondition(f"{task}@{tv.version[:12]} is still being submitted; release it once the "
                                     "submit has returned")
        self.repo.resolve(task, tv.version)  # NotFound if it was taken back meanwhile
        rid, seq = self.state.next_release_id(db)
        row = dict(id=rid, seq=seq, task=task, version=tv.version, rule=rule, rollout=rollout, stage=stage,
                   channel=channel, state="active", created_at=int(time.time()), created_by=actor or "operator",
                   note=note, bundle_digest=tv.bundle_digest, allow=_json(allow), deny=_json(deny),
                   salt=secrets.token_hex(8), config=taskconfig.to_json(resolved))
        db["releases"].insert(row)
        created = {k: row[k] for k in ("task", "version", "rule", "rollout", "stage", "channel")}
        if resolved:
            created["config"] = resolved
        self.state.log_release_change(db, rid, actor, {"created": created})
        detail = {"task": task, "version": tv.version, "rule": rule, "rollout": rollout, "stage": stage,
                  "channel": channel}
        if resolved:
            detail["config"] = resolved
        if note:
            detail["note"] = note
        self.state.audit(db, actor, action, rid, detail)
        self._settle_chain(db, task, channel, actor)
        self.state.bump_revision(db)
        return rid

    def _settle_chain(self, db, task: str, channel: str, actor: str) -> None:
        """Name what devices get: the newest live, unpaused release of a chain is 'active'; the older
        ones, which devices outside its audience fall back to, are 'fallback' (listed, pausable,
        revocable like any release); paused and revoked ones stay as they are."""
        live = db.execute_returning_dicts(
            "SELECT id, state FROM releases WHERE task=? AND channel=? AND state IN ('active','fallback') "
            "ORDER BY seq DESC", [task, channel])
        for i, r in enumerate(live):
            want = "active" if i == 0 else "fallback"
            if r["state"] != want:
                db.execute("UPDATE releases SET state=? WHERE id=?", [want, r["id"]])
                self.state.log_release_change(db, r["id"], actor, {"state": [r["state"], want]})

    def set_rollout(self, release_id: str, rollout: float, stage: str = "", actor: str = "operator") -> dict:
        rollout = self._check_rollout(rollout)
        with self.state.transaction() as db:
            rel = self._get_row(db, release_id)
            if rel["state"] not in ("active", "paused", "fallback"):
                raise FailedPrecondition(f"release {release_id} is {rel['state']}; only a live release can grow")
            if rollout < rel["rollout"]:
                raise FailedPrecondition(
                    f"rollout may only grow: {release_id} is at {rel['rollout']:g}%, asked {rollout:g}% "
                    f"(to take devices back, pause, revoke or roll back)")
            new_stage = stage or ("full" if rollout >= 100 else "gray" if rel["stage"] == "beta" and rollout > 0
                                  else rel["stage"])
            if new_stage not in STAGES:
                raise InvalidArgument(f"stage must be one of {', '.join(STAGES)} (got {new_stage!r})")
            if STAGES.index(new_stage) < STAGES.index(rel["stage"]):
                raise FailedPrecondition(f"stage may only move forward (beta -> gray -> full): {release_id} is {rel['stage']}")
            if new_stage == "full" and rollout != 100:
                raise InvalidArgument("a full release goes to 100% of its audience")
            db.execute("UPDATE releases SET rollout=?, stage=? WHERE id=?", [rollout, new_stage, release_id])
            change = {"rollout": [rel["rollout"], rollout], "stage": [rel["stage"], new_stage]}
            self.state.log_release_change(db, release_id, actor, change)
            self.state.audit(db, actor, "release.set_rollout", release_id, change)
            self.state.bump_revision(db)
        return self.get(release_id)

    def pause(self, release_id: str, actor: str = "operator") -> dict:
        return self._transition(release_id, ("active", "fallback"), "paused", "release.pause", actor)

    def resume(self, release_id: str, actor: str = "operator") -> dict:
        return self._transition(release_id, ("paused",), "fallback", "release.resume", actor)

    def revoke(self, release_id: str, actor: str = "operator") -> dict:
        with self.state.transaction() as db:
            rel = self._get_row(db, release_id)
            if rel["state"] == "revoked":
                raise FailedPrecondition(f"release {release_id} is already revoked")
            self._revoke_in(db, rel, actor, "release.revoke")
            self._settle_chain(db, rel["task"], rel["channel"], actor)
            self.state.bump_revision(db)
        return self.get(release_id)

    def _revoke_in(self, db, rel: dict, actor: str, action: str, why: str = "") -> None:
        db.execute("UPDATE releases SET state='revoked' WHERE id=?", [rel["id"]])
        change = {"state": [rel["state"], "revoked"]}
        if why:
            change["why"] = why
        self.state.log_release_change(db, rel["id"], actor, change)
        self.state.audit(db, actor, action, rel["id"], {"from": rel["state"], **({"why": why} if why else {})})

    def rollback(self, task: str, to_version: str = "", channel: str = "", actor: str = "operator") -> dict:
        """Ship an earlier version to the current release's audience, as a new release. Decided inside
        one write transaction (concurrent operators see each other's changes), and every live release
        of the version rolled back is revoked, so pausing or revoking the rollback never re-ships it."""
        channel = channel or DEFAULT_CHANNEL
        with self.state.transaction() as db:
            chain = [self.state._release_row(r) for r in db.execute_returning_dicts(
                "SELECT * FROM releases WHERE task=? AND channel=? AND state != 'revoked' ORDER BY seq DESC",
                [task, channel])]
            if not chain:
                raise NotFound(f"task {task!r} has no release on channel {channel!r} to roll back")
            current = chain[0]
            if to_version:
                target = self.repo.resolve(task, to_version)
            else:
                older = [r for r in chain[1:] if r["version"] != current["version"]]
                if not older:
                    raise FailedPrecondition(f"task {task!r} has no earlier released version than "
                                             f"{current['version'][:12]} on channel {channel!r}; use --to VERSION")
                target = older[0]["version"]
            if target == current["version"]:
                raise FailedPrecondition(f"{task} is already at {target[:12]} on channel {channel!r}")
            # The target version goes out with the config it last ran with (its defaults if never released).
            before = next((r for r in chain if r["version"] == target and r.get("config")), None)
            config = json.loads(before["config"]) if before else None
            for r in chain:
                if r["version"] == current["version"]:
                    self._revoke_in(db, r, actor, "release.revoke", f"rolled back to {target[:12]}")
            # Same audience at 100%: every device that could get the bad version now gets the target.
            rid = self._create_in(db, task, target, rule=current["rule"], rollout=100.0, stage="full",
                                  channel=channel, allow=current["allow"], deny=current["deny"], actor=actor,
                                  action="release.rollback", config=config,
                                  note=f"rollback of {current['id']} ({current['version'][:12]}) to {target[:12]}")
        return self.get(rid)

    def get(self, release_id: str) -> dict:
        rel = self.state.release(release_id)
        if rel is None:
            raise NotFound(f"unknown release {release_id!r}")
        return rel

    # -- what a device receives -----------------------------------------------------------------
    def resolve(self, info: device_pb2.DeviceInfo, explain: bool = False) -> tuple[list[device_pb2.ActiveTask], list[str]]:
        chains = self._current_chains()
        attrs = device_attrs(info)
        channel = attrs["channel"]
        ids = {x for x in (info.user_id, info.device_id) if x}
        unit = info.user_id or info.device_id
        host = parse_version(info.host_version) if info.host_version else None
        out, why = [], []
        for (task, ch), chain in chains.items():
            if ch != channel:
                continue
            for c in chain:
                verdict = self._decide(c, attrs, ids, unit, host)
                if explain:
                    row = c.row
                    why.append(f"{task}: {row['id']} ({row['version'][:12]}, {row['stage']} {row['rollout']:g}%"
                               f"{', paused' if row['state'] == 'paused' else ''}) -> "
                               f"{self._describe(verdict, c, attrs)}")
                if verdict in HITS:
                    out.append(c.task_pb)
                    break
            else:
                if explain:
                    why.append(f"{task}: no release hits this device")
        return out, why

    @staticmethod
    def _decide(c: _Compiled, attrs: dict, ids: set, unit: str, host) -> str:
        """The one decision, on the hot path: returns a verdict constant and builds no text."""
        row = c.row
        if row["state"] == "paused":
            return PAUSED
        if ids and not ids.isdisjoint(c.deny):
            return DENIED
        if c.min_host is not None and (host is None or host < c.min_host):
            return OLD_HOST
        if ids and not ids.isdisjoint(c.allow):
            return ALLOWED
        if row["stage"] == "beta":
            return BETA_ONLY
        if not c.rule.matches(attrs):
            return RULE_FALSE
        if row["rollout"] < 100:
            if not unit:
                return NO_UNIT
            if not in_rollout(row["rollout"], row["task"], row["salt"], unit):
                return OUTSIDE_ROLLOUT
        return MATCHED

    @staticmethod
    def _describe(verdict: str, c: _Compiled, attrs: dict) -> str:
        row = c.row
        if verdict == OLD_HOST:
            return f"miss: needs host_version >= {c.task_pb.manifest.min_host_version}"
        if verdict == RULE_FALSE:
            return f"miss: rule is false ({c.rule.explain(attrs)})"
        if verdict == OUTSIDE_ROLLOUT:
            return f"miss: outside the {row['rollout']:g}% rollout"
        if verdict == MATCHED:
            return "hit" + (f": rule {row['rule']!r} matched" if row["rule"] else ": every device")
        return verdict

    def _current_chains(self) -> dict[tuple[str, str], list[_Compiled]]:
        rev = self.state.cached_revision()
        with self._lock:
            if rev == self._chains_rev:
                return self._chains
        chains: dict[tuple[str, str], list[_Compiled]] = {}
        for row in reversed(self.state.releases()):  # oldest first; inserted at the front below
            if row["state"] == "revoked":
                continue
            chains.setdefault((row["task"], row["channel"]), []).insert(0, self._compile(row))
        with self._lock:
            self._chains, self._chains_rev = chains, rev
        return chains

    def _compile(self, row: dict) -> _Compiled:
        tv = self.repo.get(row["task"], row["version"])
        manifest = tv.manifest.to_proto()
        # Releases made before task config existed stored none: they run with the schema's defaults.
        config_json = row.get("config") or taskconfig.to_json(taskconfig.resolve(tv.manifest.config, None, row["id"]))
        statement = bundle.release_statement(row["bundle_digest"], row["id"], config_json)
        signature = self.signer(statement) if self.signer else b""
        pb = device_pb2.ActiveTask(name=row["task"], version=row["version"], bundle_digest=row["bundle_digest"],
                                   bundle_size=tv.bundle_size, manifest=manifest, release_id=row["id"],
                                   signature=signature, config_json=config_json)
        min_host = parse_version(manifest.min_host_version) if manifest.min_host_version else None
        return _Compiled(row, compile_rule(row["rule"]), frozenset(row["allow"]), frozenset(row["deny"]), min_host, pb)

    # -- helpers --------------------------------------------------------------------------------
    def _transition(self, release_id: str, frm: tuple[str, ...], to: str, action: str, actor: str) -> dict:
        with self.state.transaction() as db:
            rel = self._get_row(db, release_id)
            if rel["state"] not in frm:
                raise FailedPrecondition(f"release {release_id} is {rel['state']}, not {' or '.join(frm)}")
            db.execute("UPDATE releases SET state=? WHERE id=?", [to, release_id])
            self.state.log_release_change(db, release_id, actor, {"state": [rel["state"], to]})
            self.state.audit(db, actor, action, release_id, {"state": [rel["state"], to]})
            self._settle_chain(db, rel["task"], rel["channel"], actor)
            self.state.bump_revision(db)
        return self.get(release_id)

    @staticmethod
    def _get_row(db, release_id: str) -> dict:
        rows = db.execute_returning_dicts("SELECT * FROM releases WHERE id=?", [release_id])
        if not rows:
            raise NotFound(f"unknown release {release_id!r}")
        return rows[0]

    @staticmethod
    def _check_rollout(rollout: float) -> float:
        try:
            rollout = float(rollout)
        except (TypeError, ValueError):
            raise InvalidArgument(f"rollout must be a number of percent between 0 and 100 (got {rollout!r})") from None
        if not 0 <= rollout <= 100 or rollout != rollout:
            raise InvalidArgument(f"rollout must be between 0 and 100 percent (got {rollout:g})")
        return rollout

    @staticmethod
    def _id_list(name: str, ids) -> list[str]:
        ids = sorted({i.strip() for i in ids if i and i.strip()})
        if len(ids) > MAX_LIST:
            raise InvalidArgument(f"{name} list has {len(ids)} ids; at most {MAX_LIST}")
        for i in ids:
            if not ID_RE.match(i):
                raise InvalidArgument(f"{name} list: {i!r} is not a valid user or device id")
        return ids


def _json(v) -> str:
    return json.dumps(v)


def release_to_proto(row: dict, stats: dict | None = None) -> admin_pb2.Release:
    pb = admin_pb2.Release(id=row["id"], task=row["task"], version=row["version"], rule=row["rule"],
                           rollout=row["rollout"], stage=row["stage"], channel=row["channel"], state=row["state"],
                           created_at=row["created_at"], created_by=row["created_by"], note=row["note"],
                           bundle_digest=row["bundle_digest"], allow=row["allow"], deny=row["deny"], salt=row["salt"],
                           config_json=row.get("config") or "")
    if stats:
        pb.stats.CopyFrom(admin_pb2.ReleaseStats(**stats))
    return pb
