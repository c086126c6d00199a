"""The platform state suite, run against both implementations (SQLite file, PostgreSQL schema) through
the `PlatformState` interface only: what is stored reads back the same, failed transactions leave
nothing, and release decisions stay atomic when operators race each other."""
import json
import pathlib
import shutil
import threading
import time

import pytest

from walle.platform import errors
from walle.platform.manifest import validate_task_dir
from walle.platform.service import Platform
from walle.platform.state.pgcluster import fresh_schema
from walle.platform.state import open_state, state_url as default_state_url
from walle.platform.state.sqlite import SQLiteState
from walle.protos import admin_pb2, bundle, device_pb2

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def st(state_url):
    s = open_state(state_url)
    yield s
    s.close()


def _release_row(rid, seq, task="t", version="v1", state="active", channel="stable", rollout=100.0):
    return dict(id=rid, seq=seq, task=task, version=version, rule="", rollout=rollout, stage="full",
                channel=channel, state=state, created_at=1, created_by="op", note="", bundle_digest="d" * 64,
                allow=["u1"], deny=[], salt="s", config='{"k": 1}')


# -- the factory ------------------------------------------------------------------------------------
def test_factory_picks_by_url_and_names_bad_urls(tmp_path, monkeypatch):
    s = open_state(f"sqlite:///{tmp_path / 'x' / 'state.sqlite3'}")
    assert isinstance(s, SQLiteState) and (tmp_path / "x" / "state.sqlite3").exists()
    s.close()
    for bad in ("", "mysql://h/db", "sqlite://"):
        with pytest.raises(errors.InvalidArgument, match="state URL"):
            open_state(bad)
    monkeypatch.setenv("WALLE_STATE", "postgresql://nobody@127.0.0.1:1/x")
    assert default_state_url(tmp_path) == "postgresql://nobody@127.0.0.1:1/x"
    assert default_state_url(tmp_path, "sqlite:///a") == "sqlite:///a"
    monkeypatch.delenv("WALLE_STATE")
    assert default_state_url(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'state.sqlite3'}"


def test_unreachable_postgres_is_a_clear_error():
    with pytest.raises(errors.Unavailable, match="cannot reach PostgreSQL at postgresql://walle:\\*\\*\\*@"):
        open_state("postgresql://walle:secret@127.0.0.1:1/walle?connect_timeout=2")


# -- the shared suite -------------------------------------------------------------------------------
def test_revision_grows_with_each_change_and_is_seen_at_once(st):
    r0 = st.revision()
    assert st.cached_revision(max_age=3600) == r0
    with st.transaction() as tx:
        tx.bump_revision()
    assert st.revision() == r0 + 1
    assert st.cached_revision(max_age=3600) == r0 + 1  # this object's own change, not a stale cache


def test_another_writer_is_seen_by_a_fresh_read_and_then_by_the_cache(st, state_url):
    """A replica's watcher reads the revision fresh and wakes devices; their pulls, which read it
    through the cache, must not see the old one after that."""
    other = open_state(state_url)
    try:
        r0 = st.cached_revision(max_age=3600)
        with other.transaction() as tx:
            tx.bump_revision()
        if not isinstance(st, SQLiteState):  # SQLite reads afresh every time (a few microseconds)
            assert st.cached_revision(max_age=3600) == r0  # within max_age, another writer is not seen yet
        assert st.revision() == r0 + 1
        assert st.cached_revision(max_age=3600) == r0 + 1
    finally:
        other.close()


def _wait_in_thread(state, known: int) -> tuple[threading.Thread, list]:
    got: list = []
    t = threading.Thread(target=lambda: got.append(state.wait_revision(known, timeout=60)), daemon=True)
    t.start()
    return t, got


def test_a_waiter_is_woken_by_a_change_through_the_same_object(st, monkeypatch):
    """In-process changes wake waiters at once: with the poll interval at an hour, only the signal
    sent after COMMIT can end this wait before its 60 s timeout."""
    monkeypatch.setattr(st, "_poll_interval", lambda: 3600.0)
    r0 = st.revision()
    assert st.wait_revision(r0, timeout=0) == r0  # nothing changed: returns the same revision
    t, got = _wait_in_thread(st, r0)
    with st.transaction() as tx:
        tx.bump_revision()
    t.join(timeout=90)
    assert got == [r0 + 1]


@pytest.mark.postgres
def test_a_change_by_another_replica_is_pushed(pg_state_url, monkeypatch):
    """PostgreSQL pushes revision changes (LISTEN/NOTIFY): a change committed through another state
    object (another replica) reaches this one's waiter with polling effectively off."""
    monkeypatch.setenv("WALLE_STATE_FALLBACK_POLL", "3600")
    a, b = open_state(pg_state_url), open_state(pg_state_url)
    other_schema = open_state(fresh_schema(pg_state_url.split("?")[0]))
    try:
        r0 = a.revision()
        assert a.wait_revision(r0, timeout=0) == r0  # starts the listener
        assert a.listening.wait(30), "the LISTEN connection did not come up"
        heard = a.notices_heard
        t, got = _wait_in_thread(a, r0)
        with other_schema.transaction() as tx:  # another schema on the same server: not our channel
            tx.bump_revision()
        with b.transaction() as tx:
            tx.bump_revision()
        t.join(timeout=90)
        assert got == [r0 + 1]
        until = time.monotonic() + 60  # the waiter may have read the change first; the notice follows
        while a.notices_heard == heard and time.monotonic() < until:
            time.sleep(0.01)
        assert a.notices_heard == heard + 1  # one notice: ours, not the other schema's
        assert a.listening.is_set()
    finally:
        for s in (a, b, other_schema):
            s.close()
    assert not a._listener.is_alive()  # close() ends the listening thread


def test_a_failed_transaction_stores_nothing(st):
    r0 = st.revision()
    with pytest.raises(RuntimeError):
        with st.transaction() as tx:
            tx.insert_release(_release_row("r1", 1))
            tx.audit("op", "release.create", "r1")
            tx.bump_revision()
            raise RuntimeError("crash mid-way")
    assert st.release("r1") is None and st.releases() == [] and st.audit_entries() == []
    assert st.revision() == r0


def test_releases_chain_and_log_round_trip(st):
    with st.transaction() as tx:
        assert tx.next_release_id() == ("r1", 1)
        tx.insert_release(_release_row("r1", 1, version="a", state="fallback"))
        assert tx.next_release_id() == ("r2", 2)
        tx.insert_release(_release_row("r2", 2, version="b"))
        tx.insert_release(_release_row("r3", 3, channel="beta"))
        tx.update_release("r2", rollout=12.5, stage="gray")
        tx.log_release_change("r2", "op", {"rollout": [100, 12.5]})
        assert [r["id"] for r in tx.chain("t", "stable", ("active", "fallback"))] == ["r2", "r1"]
        with pytest.raises(ValueError):
            tx.update_release("r2", id="r9")
    r2 = st.release("r2")
    assert (r2["rollout"], r2["stage"], r2["allow"], r2["deny"], r2["config"]) == (12.5, "gray", ["u1"], [], '{"k": 1}')
    assert [r["id"] for r in st.releases()] == ["r3", "r2", "r1"]
    assert [r["id"] for r in st.releases(task="t", channel="stable")] == ["r2", "r1"]
    with st.transaction() as tx:
        tx.update_release("r1", state="revoked")
    assert [r["id"] for r in st.releases(active_only=True)] == ["r3", "r2"]
    assert [(e["actor"], e["change"]) for e in st.release_log("r2")] == [("op", '{"rollout": [100, 12.5]}')]


def test_devices_credentials_and_fleet_counts(st):
    with st.transaction() as tx:
        tx.put_device("d1", "h1", 10, 0, "alice")
        tx.put_device("d2", "h2", 10, 99, "")
        assert tx.device("d1")["user_id"] == "alice"
    assert st.device_by_token("h1")["device_id"] == "d1" and st.device_by_token("nope") is None
    with st.transaction() as tx:
        tx.put_device("d1", "h1b", 20, 0, "bob")  # re-enrolment replaces the credential
        assert tx.revoke_device("d2") and not tx.revoke_device("d9")
    assert st.device_by_token("h1") is None and st.device("d1")["user_id"] == "bob"
    assert st.device("d2")["revoked"] == 1 and [d["device_id"] for d in st.devices()] == ["d1", "d2"]
    st.touch_devices({"d1": (1000, "1.2.0", '{"os": "android"}'), "d2": (1000, "1.0.0", "{}")})
    assert (st.device("d1")["last_seen"], st.device("d1")["attrs"]) == (1000, '{"os": "android"}')
    st.add_reports("delivery", [("d1", 1, 1000, "t", "v1", "r1", "installed", ""),
                                ("d1", 2, 1001, "t", "v2", "r2", "installed", "")])
    counts = st.fleet_counts(since=500)
    assert counts["enrolled"] == 1  # d2 is revoked
    assert counts["by_app_version"] == [{"app_version": "1.2.0", "devices": 1}]
    assert counts["by_task"] == [{"task": "t", "version": "v2", "devices": 1}]
    assert st.fleet_counts(since=2000)["by_app_version"] == []


def test_credentials_revision_moves_with_credentials_only(st, state_url):
    c0 = st.credentials_revision()
    with st.transaction() as tx:
        tx.bump_revision()  # a release: the credential caches may stay
    assert st.credentials_revision() == c0
    with st.transaction() as tx:
        tx.put_device("d1", "h1", 10, 0, "")
    other = open_state(state_url)  # another replica sees both changes
    try:
        assert other.credentials_revision() == st.credentials_revision() > c0
        with other.transaction() as tx:
            tx.revoke_device("d1")
        assert st.credentials_revision() > other.credentials_revision() - 1 > c0
    finally:
        other.close()


def test_a_revocation_elsewhere_empties_the_credential_caches_but_a_release_does_not(st, state_url):
    from walle.platform.auth import DeviceCredentials
    here = DeviceCredentials(st)
    _d, token = here.enroll("d1", user_id="alice")
    assert here.verify(token) == "d1" and here.bound_user("d1") == "alice"
    other_state = open_state(state_url)  # another replica
    try:
        with other_state.transaction() as tx:
            tx.bump_revision()
        # cached across the revision change: the answer holds even if the row is gone behind our back
        reads = []
        real = st.device_by_token
        st.device_by_token = lambda h: reads.append(h) or real(h)
        st.revision()  # this replica has seen the release (a fresh read refreshes the cache)
        assert here.verify(token) == "d1" and reads == []
        DeviceCredentials(other_state).revoke("d1")
        st.revision()  # ... and the revocation (pushed or polled within 0.2 s in a server)
        with pytest.raises(errors.Unauthenticated, match="revoked"):
            here.verify(token)
        assert len(reads) == 1
    finally:
        other_state.close()


def test_operators(st):
    assert not st.any_operator()
    with st.transaction() as tx:
        tx.put_operator("ana", "oh", 1)
    assert st.any_operator() and st.operator_by_token("oh")["name"] == "ana"
    with st.transaction() as tx:
        assert tx.revoke_operator("ana") and not tx.revoke_operator("zed")
    assert not st.any_operator() and st.operator_by_token("oh")["revoked"] == 1


def test_reports_are_stored_once_and_counted(st):
    run = lambda seq, status, d: ("d1", seq, 5, "t", "v1", "r1", status, d, 100, "", "manual")  # noqa: E731
    assert st.add_reports("run_report", [run(1, "ok", 0.5), run(2, "error", 1.5), run(3, "ok", 0.25)]) == 3
    assert st.add_reports("run_report", [run(3, "ok", 9.0), run(4, "ok", 1.0)]) == 1  # 3 was stored already
    assert st.add_reports("delivery", [("d1", 5, 5, "t", "v1", "r1", "installed", "")]) == 1
    assert st.add_reports("event", [("d1", 6, 5, '{"a": 1}'), ("d1", 7, 5, '{"a": 2}')]) == 2
    assert st.add_reports("log", [("d1", 8, 5, "hello")]) == 1
    assert [r["seq"] for r in st.reports("run_report", device_id="d1")] == [1, 2, 3, 4]
    assert st.reports("run_report")[2]["duration_s"] == 0.25
    assert [r["payload"] for r in st.reports("event")] == ['{"a": 1}', '{"a": 2}']
    assert [(r["seq"], r["topic"]) for r in st.events("d1")] == [(6, "event"), (7, "event"), (8, "log")]
    stats = st.release_stats_many(["r1", "r9"])
    assert stats["r1"] == {"delivered": 1, "ran": 1, "runs": 4, "failed": 1, "p50_duration_s": 0.5,
                           "rejected": 0, "rolled_back": 0}
    assert stats["r9"]["runs"] == 0 and st.release_stats("r1")["failed"] == 1


def test_up_streams_and_deliveries(st):
    assert st.stream_slot("d1", 111, 2) == (0, 0)
    assert st.stream_slot("d1", 111, 2) == (0, 0)
    assert st.stream_slot("d1", 222, 2) == (1, 0)
    with pytest.raises(errors.ResourceExhausted, match="at most 2"):
        st.stream_slot("d1", 333, 2)
    assert st.raise_stream_hw("d1", 111, 7) == 7
    assert st.raise_stream_hw("d1", 111, 3) == 7  # the high-water mark never goes down
    assert st.stream_slot("d1", 111, 2) == (0, 7)
    st.record_deliveries({("d1", "r1"), ("d1", "r2")})
    st.record_deliveries({("d1", "r1")})
    assert st.delivered_releases("d1", {"r1", "r3"}) == {"r1"} and st.delivered_releases("d2", {"r1"}) == set()


def test_many_uploads_are_stored_in_one_transaction(st):
    from walle.platform.state import UploadWrite
    span = 1000
    dl = lambda d, seq, r="r1": (d, seq, 5, "t", "v1", r, "installed", "")  # noqa: E731
    ev = lambda d, seq: (d, seq, 5, '{"a": %d}' % seq)  # noqa: E731
    assert st.stream_slot("d2", 7, 3) == (0, 0)  # d2 already has one epoch
    with st.transaction() as tx:
        tx.put_device("d1", "h1", 1, 0, "")
    out = st.store_uploads([
        UploadWrite("d1", 11, 2, {"delivery": [dl("d1", 1), dl("d1", 2)]}),
        UploadWrite("d2", 8, 4, {"delivery": [dl("d2", 3)], "event": [ev("d2", 4)]}),  # d2's second epoch: k = 1
        UploadWrite("d1", 11, 3, {"delivery": [dl("d1", 2), dl("d1", 3)]}),  # seq 2 twice in one batch: once
        UploadWrite("d3", 1, 1, {"delivery": [dl("d3", 1)]}),
    ], span, 3)
    assert out == [({"delivery": 2}, 3), ({"delivery": 1, "event": 1}, 4), ({"delivery": 1}, 3), ({"delivery": 1}, 1)]
    assert [r["seq"] for r in st.reports("delivery", device_id="d1")] == [1, 2, 3]
    assert [r["seq"] for r in st.reports("delivery", device_id="d2")] == [span + 3]
    assert [(r["seq"], r["topic"]) for r in st.events("d2")] == [(span + 4, "event")]
    assert st.stream_slot("d2", 8, 3) == (1, 4) and st.stream_slot("d1", 11, 3) == (0, 3)
    # re-sent: duplicates; the high-water mark never goes down; a device over its epochs is refused alone
    st.stream_slot("d3", 2, 3)
    st.stream_slot("d3", 3, 3)
    out = st.store_uploads([UploadWrite("d1", 11, 2, {"delivery": [dl("d1", 1)]}),
                            UploadWrite("d3", 4, 1, {"delivery": [dl("d3", 1)]})], span, 3)
    assert out[0] == ({"delivery": 0}, 3)
    assert isinstance(out[1], errors.ResourceExhausted) and "at most 3" in str(out[1])
    assert [r["seq"] for r in st.reports("delivery", device_id="d3")] == [1]


def test_a_failed_upload_batch_stores_nothing_of_any_device(st):
    from walle.platform.state import UploadWrite
    dl = lambda d, seq: (d, seq, 5, "t", "v1", "r1", "installed", "")  # noqa: E731
    bad = ("d2", 1, 5, "t", "v1", "r1", None, "")  # status may not be NULL: the database refuses it
    with pytest.raises(Exception):
        st.store_uploads([UploadWrite("d1", 1, 2, {"delivery": [dl("d1", 1), dl("d1", 2)]}),
                          UploadWrite("d2", 1, 1, {"delivery": [bad]})], 1000, 3)
    assert st.reports("delivery") == []
    assert st.stream_slot("d1", 1, 3) == (0, 0)  # the slot made in the failed batch is gone too


def test_submit_intents_and_audit(st):
    i1 = st.begin_submit("t", "", "ana", repo="A")
    i2 = st.begin_submit("t", "abc", "bob", repo="A")
    i3 = st.begin_submit("t", "abc", "cy", repo="B")
    assert i2 > i1 and [p["actor"] for p in st.pending_submits("A")] == ["ana", "bob"]
    assert [p["actor"] for p in st.pending_submits("B")] == ["cy"]  # a replica's repository is its own
    st.end_submit(i3)
    st.end_submit(i1, "task.submit", "t@v1", {"digest": "x"})
    st.end_submit(i2)
    assert st.pending_submits("A") == [] and st.pending_submits("B") == []
    assert [(e["actor"], e["action"], e["target"], e["detail"]) for e in st.audit_entries()] == [
        ("ana", "task.submit", "t@v1", '{"digest": "x"}')]


def test_resources_and_published_task_versions(st):
    with st.transaction() as tx:
        assert tx.add_resource("m/emb", "d1", 10, "{}", 1) == "v1"
        assert tx.add_resource("m/emb", "d2", 20, '{"k": 1}', 2) == "v2"
    assert st.resource("m/emb")["digest"] == "d2" and st.resource("m/emb", "v1")["size"] == 10
    assert st.resource("m/none") is None
    blob = bytes(range(256)) * 10
    st.publish_task_version("t", "v1", "dg", b"\x00manifest", blob, 100)
    st.publish_task_version("t", "v1", "dg", b"\x00manifest", blob, 100)  # idempotent
    st.publish_task_version("t", "v0", "dg0", b"m0", b"old", 50)
    assert st.published_task_version("t", "v1") == {"version": "v1", "digest": "dg", "manifest": b"\x00manifest",
                                                    "size": 2560}
    assert st.published_task_version("t")["version"] == "v1"  # the newest
    assert st.blob("dg") == blob and st.blob("dg0") == b"old" and st.blob("zz") is None
    st.put_blob("r1", b"\x00resource")
    st.put_blob("r1", b"\x00resource")
    assert st.blob("r1") == b"\x00resource"
    assert st.published_task_version("t", "v2") is None and st.published_task_version("u") is None


# -- atomic release decisions, raced through the platform on each implementation ----------------------
def _versions(tmp_path, p, n):
    out = []
    for i in range(n):
        dst = tmp_path / f"v{i}"
        shutil.copytree(ROOT / "tasks" / "hello", dst)
        (dst / "main.py").write_text((dst / "main.py").read_text() + f"\n# version {i}\n")
        out.append(p.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(validate_task_dir(dst)[1]),
                                                            author="op")))
    return out


def _race(fns):
    """Run the callables at once (released together by a barrier); their results or errors."""
    barrier = threading.Barrier(len(fns))
    out = [None] * len(fns)

    def run(i, fn):
        barrier.wait()
        try:
            out[i] = fn()
        except errors.WalleError as e:
            out[i] = e
    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def test_racing_releases_leave_one_active_per_chain(tmp_path, state_url):
    p = Platform(tmp_path / "data", state=state_url)
    vs = _versions(tmp_path, p, 4)
    got = _race([lambda v=v: p.releases.create("hello", v.version, actor=f"op{i}") for i, v in enumerate(vs)])
    assert all(isinstance(r, dict) for r in got)
    rows = p.state.releases(task="hello")
    assert sorted(r["state"] for r in rows) == ["active", "fallback", "fallback", "fallback"]
    assert rows[0]["state"] == "active"  # the newest one
    p.state.close()


def test_racing_rollouts_only_grow(tmp_path, state_url):
    p = Platform(tmp_path / "data", state=state_url)
    (v,) = _versions(tmp_path, p, 1)
    rid = p.releases.create("hello", v.version, rollout=1, stage="gray")["id"]
    asks = [5, 40, 20, 60, 10, 30]
    got = _race([lambda a=a: p.releases.set_rollout(rid, a) for a in asks])
    assert p.state.release(rid)["rollout"] == 60
    steps = [c for c in (json.loads(e["change"]) for e in p.state.release_log(rid)) if "rollout" in c]
    assert all(old < new for old, new in (c["rollout"] for c in steps))  # every recorded step grew
    refused = [g for g in got if isinstance(g, errors.FailedPrecondition)]
    assert len(steps) + len(refused) == len(asks) and all("may only grow" in e.message for e in refused)
    p.state.close()


def test_racing_rollbacks_decide_once(tmp_path, state_url):
    """Three operators roll back at once from separate platform objects (separate connections): one
    rollback happens, the others see it and are refused; devices get the earlier version."""
    ps = [Platform(tmp_path / "data", state=state_url) for _ in range(3)]
    v1, v2 = _versions(tmp_path, ps[0], 2)
    ps[0].releases.create("hello", v1.version)
    bad = ps[0].releases.create("hello", v2.version)
    got = _race([lambda p=p, i=i: p.releases.rollback("hello", actor=f"op{i}") for i, p in enumerate(ps)])
    done = [g for g in got if isinstance(g, dict)]
    assert len(done) == 1 and done[0]["version"] == v1.version
    # the others decided after it: nothing earlier than v1 is left to roll back to
    assert all(isinstance(g, errors.FailedPrecondition) and "no earlier released version" in g.message
               for g in got if g is not done[0])
    assert ps[1].state.release(bad["id"])["state"] == "revoked"
    info = device_pb2.DeviceInfo(device_id="d1", host_version="9.0.0")
    assert [t.version for t in ps[2].releases.resolve(info)[0]] == [v1.version]
    for p in ps:
        p.state.close()


def test_guards_and_what_operators_read(st):
    row = dict(release_id="r1", max_failure_rate=0.2, min_runs=2, max_p99_seconds=0.0, on_trip="pause", actor="ana",
               status="watching", trip_detail="", tripped_at=0, action_release_id="", created_at=1)
    with st.transaction() as tx:
        tx.put_guard(row)
        tx.put_guard(dict(row, min_runs=3))  # replaces
        tx.put_guard(dict(row, release_id="r2"))
    assert st.guard("r1")["min_runs"] == 3 and st.guard("r9") is None
    assert st.guard_states() == {"r1": "watching", "r2": "watching"}
    with st.transaction() as tx:
        assert tx.claim_guard("r1", '{"why": 1}', 5) and not tx.claim_guard("r1", "{}", 6)  # judged once
        tx.set_guard_action("r1", "r3", '{"why": 2}')
    assert (st.guard("r1")["status"], st.guard("r1")["action_release_id"]) == ("tripped", "r3")
    assert [g["release_id"] for g in st.guards(["r1", "r2"], status="watching")] == ["r2"]

    run = lambda d, seq, status, dur: (d, seq, 10 * seq, "t", "v1", "r1", status, dur, 1, f"E{seq}", "manual")  # noqa: E731
    st.add_reports("run_report", [run("d1", 1, "ok", 1.0), run("d2", 2, "error", 3.0), run("d1", 3, "error", 2.0)])
    st.add_reports("log", [("d1", 4, 1, '{"lines": ["x"]}')])
    fig = st.health_figures("r1")
    assert (fig["runs"], fig["failed"], fig["p99_seconds"]) == (3, 2, 3.0)
    assert st.run_durations("r1") == [1.0, 2.0, 3.0]
    page = st.run_reports_page(0, 2)
    assert [r["seq"] for r in page] == [3, 2]  # newest first
    assert [r["seq"] for r in st.run_reports_page(page[-1]["cursor"], 10)] == [3]
    assert [r["seq"] for r in st.run_reports_page(0, 10, status="failed", device_id="d1")] == [3]
    assert [r["seq"] for r in st.run_reports_page(0, 10, since=20)] == [3, 2]
    assert st.log_payloads("d1", 3, 10) == ['{"lines": ["x"]}'] and st.log_payloads("d1", 4, 10) == []
    devices, failures = st.release_failures("r1", 10)
    assert devices == 2 and [f["error"] for f in failures] == ["E3", "E2"]
    assert st.failed_runs_by_device() == {"d1": 1, "d2": 1}

    with st.transaction() as tx:
        tx.put_device("d1", "h1", 1, 0, "")
        tx.put_operator("ana", "oh", 1)
        for action in ("release.create", "release.guard_trip", "releases_x", "device.enroll"):
            tx.audit("ana", action, "r1")
    st.touch_devices({"d1": (100, "1.0", '{"os": "x"}')})
    assert st.device_attrs() == ['{"os": "x"}'] and st.count_devices() == 1 and st.count_devices(200) == 0
    st.add_reports("delivery", [("d1", 5, 1, "t", "v1", "r1", "installed", ""),
                                ("d1", 6, 2, "t", "v2", "r2", "installed", "")])
    assert [(r["task"], r["version"]) for r in st.installed("d1")] == [("t", "v2")]
    assert [o["name"] for o in st.operators()] == ["ana"]
    actions = lambda **kw: [e["action"] for e in st.audit_search(100, **kw)]  # noqa: E731
    assert actions(action="release.") == ["release.guard_trip", "release.create"]  # a family, '_' not a wildcard
    assert actions(action="release.create") == ["release.create"]
    assert actions(exclude_actions=["release."], actor="ana") == ["device.enroll", "releases_x"]
