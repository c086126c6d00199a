"""A fleet of 20 emulated devices against a real platform: attributes drawn from a profile, a release
with a hit rule reaches exactly the matching subset, the shared watcher brings a new release to all of
them, runs in the shared sandbox are counted, and pre-made credentials work."""
import json
import pathlib

import pytest
from packaging.version import Version

from walle.device_host.fleet import Fleet, draw_attrs
from walle.device_host.identity import IdentityError
from walle.device_host.sandbox import Sandbox
from walle.platform.manifest import validate_task_dir
from walle.platform.server import build_server
from walle.platform.service import Platform
from walle.protos import admin_pb2, bundle

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROFILE = {"os": {"android": 6, "ios": 4}, "app_version": {"2.3.0": 5, "1.9.0": 5}, "region": {"east": 1, "west": 1}}
RULE = 'os == "android" and app_version >= "2.0"'


@pytest.fixture
def live(tmp_path):
    platform = Platform(tmp_path / "platform")
    server, port, stop = build_server(platform, port=0)
    yield platform, f"127.0.0.1:{port}"
    stop(0)


def submit_hello(platform, tmp_path, text=""):
    src = tmp_path / f"hello{text}"
    import shutil
    shutil.copytree(ROOT / "tasks" / "hello", src)
    if text:
        (src / "main.py").write_text((src / "main.py").read_text() + f"\n# {text}\n")
    _m, files = validate_task_dir(src)
    return platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), author="t"))


def test_profile_draw_is_deterministic_and_validated():
    a, b = draw_attrs(PROFILE, 50, seed=7), draw_attrs(PROFILE, 50, seed=7)
    assert a == b and a != draw_attrs(PROFILE, 50, seed=8)
    assert {x["os"] for x in a} == {"android", "ios"}
    with pytest.raises(IdentityError, match="weights"):
        draw_attrs({"os": {"android": -1}}, 3)
    with pytest.raises(IdentityError, match="unknown device attribute"):
        draw_attrs({"colour": {"red": 1}}, 3)


def test_rule_hits_the_right_subset_and_watch_fans_out(live, tmp_path):
    platform, address = live
    enrolled = []

    def enroll(device_id, user_id):
        enrolled.append(device_id)
        return platform.EnrollDevice(admin_pb2.EnrollRequest(device_id=device_id, user_id=user_id,
                                                             actor="fleet-test")).token

    sandbox = Sandbox(workers=2)
    fleet = Fleet(20, address, tmp_path / "fleet", profile=PROFILE, seed=3, sandbox=sandbox, enroll=enroll, workers=8)
    try:
        assert len(enrolled) == 20
        # each device is bound to the user its profile names, at enrollment
        assert {platform.device_user(d.device_id) for d in fleet.devices} == {f"u{i:06d}" for i in range(20)}
        v1 = submit_hello(platform, tmp_path)
        r1 = platform.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=v1.version, rule=RULE))
        st = fleet.sync_all()
        assert st.synced == 20 and st.failed == 0
        expected = {d.device_id for d in fleet.devices
                    if d.attrs["os"] == "android" and Version(d.attrs["app_version"]) >= Version("2.0")}
        assert 0 < len(expected) < 20  # the seed gives a real subset
        got = {d.device_id for d in fleet.devices if "hello" in d.installed()}
        assert got == expected and st.installed == len(expected)
        assert fleet.installed_counts() == {"hello": len(expected)}

        runs = fleet.emit_all("hello", {"who": "fleet"})
        assert runs == len(expected)
        s = fleet.summary()
        assert s["runs_ok"] == len(expected) and s["runs_failed"] == 0
        assert fleet.flush_all() == 0
        stats = platform.GetRelease(admin_pb2.ReleaseRef(id=r1.id)).stats
        assert stats.delivered == len(expected) and stats.ran == len(expected)

        # One shared WatchTasks stream: a new release reaches every matching device without polling.
        fleet.start_watch()
        assert fleet.wait_change(5)  # the stream's first message says it is live
        v2 = submit_hello(platform, tmp_path, "v2")
        platform.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=v2.version, rule=RULE))
        assert fleet.wait_change(5)
        st = fleet.sync_all()
        assert st.installed == len(expected)
        assert {d.installed()["hello"].version for d in fleet.devices if d.device_id in expected} == {v2.version}
        s = fleet.summary()
        assert s["tasks_installed"] == 2 * len(expected) and s["sync_p99_s"] >= s["sync_p50_s"] > 0
        fleet.print_summary()
    finally:
        fleet.close()
        sandbox.close()

    # Restarting the fleet on the same folders reuses the saved credentials (no new enrollment).
    again = Fleet(20, address, tmp_path / "fleet", profile=PROFILE, seed=3, enroll=enroll)
    try:
        assert len(enrolled) == 20
        assert again.sync_all().synced == 20
        assert len([d for d in again.devices if "hello" in d.installed()]) == len(expected)
    finally:
        again.close()


def test_premade_credentials_and_jsonl_attributes(live, tmp_path):
    platform, address = live
    creds = tmp_path / "creds.jsonl"
    attrs = tmp_path / "attrs.jsonl"
    with creds.open("w") as c, attrs.open("w") as a:
        for i, os_name in enumerate(["android", "ios", "android"]):
            token = platform.EnrollDevice(admin_pb2.EnrollRequest(device_id=f"pre-{i}")).token
            c.write(json.dumps({"device_id": f"pre-{i}", "token": token}) + "\n")
            a.write(json.dumps({"device_id": f"pre-{i}", "os": os_name, "app_version": "2.3.0"}) + "\n")
    v1 = submit_hello(platform, tmp_path)
    platform.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=v1.version, rule=RULE))
    fleet = Fleet(3, address, tmp_path / "f", profile_file=attrs, credentials_file=creds)
    try:
        assert fleet.sync_all().synced == 3
        assert [("hello" in d.installed()) for d in fleet.devices] == [True, False, True]
    finally:
        fleet.close()
    with pytest.raises(IdentityError, match="3 credentials for 5 devices"):
        Fleet(5, address, tmp_path / "g", credentials_file=creds)
