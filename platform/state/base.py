"""The platform's durable state behind one interface: releases and their change log, enrolled
devices and their credentials, operators, the audit trail, device reports, published resources, the
task versions devices download, and a `revision` counter that grows on every change that can alter
what a device receives (servers compare it on each request, so a change made by another process or
replica is seen within a poll interval).

Two implementations: SQLite (one file, the embedded default) and PostgreSQL (shared by several
serving replicas); `walle.platform.state.open_state(url)` picks one. Callers never see SQL: reads
are methods here, writes that must be decided atomically happen inside `transaction()`, whose
`Transaction` object offers the write operations."""
from __future__ import annotations

import abc
from contextlib import AbstractContextManager
from dataclasses import dataclass


@dataclass
class UploadWrite:
    """One device's checked up-tunnel batch for `store_uploads`: report rows per topic as
    `add_reports` takes them, numbered in the device's epoch (the state adds the epoch's base)."""
    device_id: str
    epoch: int
    top: int  # the batch's highest seq
    rows: dict[str, list[tuple]]


class Transaction(abc.ABC):
    """One atomic write. Release decisions (what is active, rollout growth, rollbacks) are
    serialised: a transaction sees every earlier committed one and no other decision interleaves."""

    # -- shared ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def audit(self, actor: str, action: str, target: str, detail: dict | str = "") -> None: ...

    @abc.abstractmethod
    def bump_revision(self) -> None: ...

    # -- releases -------------------------------------------------------------------------------
    @abc.abstractmethod
    def next_release_id(self) -> tuple[str, int]: ...

    @abc.abstractmethod
    def release(self, release_id: str) -> dict | None: ...

    @abc.abstractmethod
    def chain(self, task: str, channel: str, states: tuple[str, ...]) -> list[dict]:
        """The task's releases on a channel in those states, newest first."""

    @abc.abstractmethod
    def insert_release(self, row: dict) -> None: ...

    @abc.abstractmethod
    def update_release(self, release_id: str, **fields) -> None: ...

    @abc.abstractmethod
    def log_release_change(self, release_id: str, actor: str, change: dict) -> None: ...

    # -- devices and operators ------------------------------------------------------------------
    @abc.abstractmethod
    def device(self, device_id: str) -> dict | None: ...

    @abc.abstractmethod
    def put_device(self, device_id: str, token_hash: str, enrolled_at: int, expires_at: int, user_id: str) -> None:
        """Enrol or re-enrol (a new credential replaces the old one, revocation is lifted)."""

    @abc.abstractmethod
    def revoke_device(self, device_id: str) -> bool:
        """False if the device is unknown."""

    @abc.abstractmethod
    def put_operator(self, name: str, token_hash: str, created_at: int) -> None: ...

    @abc.abstractmethod
    def revoke_operator(self, name: str) -> bool: ...

    # -- release guards -------------------------------------------------------------------------
    @abc.abstractmethod
    def put_guard(self, row: dict) -> None:
        """Set (or replace) a release's guard."""

    @abc.abstractmethod
    def claim_guard(self, release_id: str, detail: str, at: int) -> bool:
        """Mark a watching guard tripped; False if it was not watching (another judge was first)."""

    @abc.abstractmethod
    def set_guard_action(self, release_id: str, action_release_id: str, detail: str) -> None: ...

    # -- resources ------------------------------------------------------------------------------
    @abc.abstractmethod
    def add_resource(self, name: str, digest: str, size: int, metadata: str, created_at: int) -> str:
        """Store the next version of a resource; returns it ('v1', 'v2', ...)."""


class PlatformState(abc.ABC):
    url: str

    @abc.abstractmethod
    def transaction(self) -> AbstractContextManager[Transaction]: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    # -- revision -------------------------------------------------------------------------------
    @abc.abstractmethod
    def revision(self) -> int: ...

    @abc.abstractmethod
    def cached_revision(self, max_age: float = 0.2) -> int:
        """The revision read at most every `max_age` s; this object's own changes are seen at once."""

    @abc.abstractmethod
    def credentials_revision(self) -> int:
        """A counter that every credential change (enrollment, revocation) raises, read afresh. Such
        a change also bumps the revision; most revision changes (releases) leave this one alone, so
        caches of credentials outlive them."""

    @abc.abstractmethod
    def wait_revision(self, known: int, timeout: float) -> int:
        """Block until the revision differs from `known` or `timeout` s have passed; returns the
        revision then. Changes through this object wake waiters at once; changes by other processes
        are pushed where the database can (PostgreSQL LISTEN/NOTIFY), else polled."""

    # -- audit and releases ---------------------------------------------------------------------
    @abc.abstractmethod
    def audit_entries(self, limit: int = 100) -> list[dict]:
        """Newest first: ts, actor, action, target, detail."""

    @abc.abstractmethod
    def release(self, release_id: str) -> dict | None: ...

    @abc.abstractmethod
    def releases(self, task: str = "", channel: str = "", active_only: bool = False) -> list[dict]:
        """Newest first; `active_only`: those devices may get (active, fallback, paused)."""

    @abc.abstractmethod
    def release_log(self, release_id: str) -> list[dict]: ...

    @abc.abstractmethod
    def release_stats_many(self, release_ids: list[str]) -> dict[str, dict]: ...

    def release_stats(self, release_id: str) -> dict:
        return self.release_stats_many([release_id])[release_id]

    # -- devices --------------------------------------------------------------------------------
    @abc.abstractmethod
    def device(self, device_id: str) -> dict | None: ...

    @abc.abstractmethod
    def devices(self) -> list[dict]: ...

    @abc.abstractmethod
    def device_by_token(self, token_hash: str) -> dict | None: ...

    @abc.abstractmethod
    def touch_devices(self, seen: dict[str, tuple[int, str, str]]) -> None:
        """device -> (last seen, app version, attributes JSON), in one transaction."""

    @abc.abstractmethod
    def fleet_counts(self, since: int) -> dict:
        """Devices seen since `since` (not revoked) by app version and by installed task version,
        and the number enrolled: {"by_app_version": [...], "by_task": [...], "enrolled": n}."""

    # -- operators ------------------------------------------------------------------------------
    @abc.abstractmethod
    def operator_by_token(self, token_hash: str) -> dict | None: ...

    @abc.abstractmethod
    def any_operator(self) -> bool: ...

    # -- device reports (up tunnel) -------------------------------------------------------------
    @abc.abstractmethod
    def stream_slot(self, device_id: str, epoch: int, max_streams: int) -> tuple[int, int]:
        """(k, high-water seq) of a device's up-tunnel epoch; a new epoch gets the next slot."""

    @abc.abstractmethod
    def store_uploads(self, writes: list[UploadWrite], span: int, max_streams: int) -> list:
        """Many devices' upload batches in ONE transaction (group commit): for each, the epoch's
        slot k (made if new, at most `max_streams` per device), its rows stored once with seq
        k * span + seq, and the epoch's high-water mark raised to `top`. Returns per write either
        ({topic: rows newly stored}, high-water mark) or the WalleError that refused it alone
        (it stored nothing). Anything else raised means the transaction stored nothing at all."""

    @abc.abstractmethod
    def raise_stream_hw(self, device_id: str, epoch: int, seq: int) -> int: ...

    @abc.abstractmethod
    def add_reports(self, topic: str, rows: list[tuple]) -> int:
        """Store report records, skipping (device, seq) already stored; returns how many were new.
        Rows: run_report (device, seq, ts, task, version, release, status, duration_s, peak_kb,
        error, trigger); delivery (device, seq, ts, task, version, release, status, error);
        any other topic (device, seq, ts, payload text)."""

    @abc.abstractmethod
    def reports(self, topic: str, device_id: str = "", status: str = "") -> list[dict]:
        """Stored records of a topic ('run_report', 'delivery' or an event topic), oldest first."""

    @abc.abstractmethod
    def events(self, device_id: str) -> list[dict]:
        """A device's stored records of every topic other than the reports, in seq order."""

    @abc.abstractmethod
    def record_deliveries(self, pairs: set[tuple[str, str]]) -> None:
        """(device, release) pairs the platform handed out; reports are accepted only for those."""

    @abc.abstractmethod
    def delivered_releases(self, device_id: str, release_ids: set[str]) -> set[str]: ...

    # -- submits --------------------------------------------------------------------------------
    @abc.abstractmethod
    def begin_submit(self, task: str, parent: str, actor: str, repo: str = "") -> int:
        """Record a submit's intent; `repo` names the task repository it commits to."""

    @abc.abstractmethod
    def pending_submits(self, repo: str = "") -> list[dict]:
        """Unsettled intents of that repository (and of unnamed ones, from before they had names)."""

    @abc.abstractmethod
    def end_submit(self, intent_id: int, action: str = "", target: str = "", detail: dict | None = None) -> None:
        """Drop the intent and write its audit entry (if `action`), atomically."""

    # -- resources and published task versions --------------------------------------------------
    @abc.abstractmethod
    def resource(self, name: str, version: str = "") -> dict | None:
        """A resource's newest version, or the named one."""

    @abc.abstractmethod
    def publish_task_version(self, task: str, version: str, digest: str, manifest: bytes, bundle: bytes,
                             created_at: int) -> None:
        """What devices need of a submitted version (manifest proto bytes, bundle bytes), for
        replicas that do not hold the task repository. Idempotent."""

    @abc.abstractmethod
    def published_task_version(self, task: str, version: str = "") -> dict | None:
        """{"version", "digest", "manifest", "size"} of a published version (the newest when
        `version` is ""), or None."""

    @abc.abstractmethod
    def put_blob(self, digest: str, data: bytes) -> None:
        """Bytes by their digest (bundles, resources), shared by every replica. Idempotent."""

    @abc.abstractmethod
    def blob(self, digest: str) -> bytes | None: ...

    # -- release guards and what operators read of reports ----------------------------------------
    @abc.abstractmethod
    def guard(self, release_id: str) -> dict | None: ...

    @abc.abstractmethod
    def guards(self, release_ids: list[str], status: str = "") -> list[dict]: ...

    @abc.abstractmethod
    def guard_states(self) -> dict[str, str]:
        """release id -> guard status, for every guarded release."""

    @abc.abstractmethod
    def health_figures(self, release_id: str, p99: bool = True) -> dict:
        """runs, failed, failure_rate and (when asked) p99_seconds of a release's run reports."""

    @abc.abstractmethod
    def run_reports_page(self, after: int, limit: int, status: str = "", since: int = 0, **equal) -> list[dict]:
        """Run reports newer than the cursor `after`, newest first, each with its `cursor`; `equal`
        narrows by release_id/task/device_id; status "failed" means any status but ok."""

    @abc.abstractmethod
    def log_payloads(self, device_id: str, after_seq: int, upto_seq: int) -> list[str]: ...

    @abc.abstractmethod
    def release_failures(self, release_id: str, limit: int) -> tuple[int, list[dict]]:
        """(devices with a failed run, the newest failed runs: device_id, error, status)."""

    @abc.abstractmethod
    def run_durations(self, release_id: str) -> list[float]:
        """Sorted."""

    @abc.abstractmethod
    def installed(self, device_id: str) -> list[dict]:
        """The device's latest delivery report per task."""

    @abc.abstractmethod
    def device_attrs(self) -> list[str]:
        """Last-reported attributes (JSON) of every unrevoked device that reported some."""

    @abc.abstractmethod
    def failed_runs_by_device(self) -> dict[str, int]: ...

    @abc.abstractmethod
    def count_devices(self, seen_since: int = 0) -> int:
        """Unrevoked devices seen since then."""

    @abc.abstractmethod
    def operators(self) -> list[dict]: ...

    @abc.abstractmethod
    def audit_search(self, limit: int, action: str = "", exclude_actions=(), actor: str = "", target: str = "",
                     since: int = 0) -> list[dict]:
        """Newest first; an action pattern ending in "." matches the family ("release.")."""
