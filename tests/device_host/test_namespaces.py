"""Tasks are isolated from each other: sharing a storage namespace must be granted by both tasks
(namespace_members), never claimed. Refused at submit on the platform and at install on the device;
the CoDA tasks, which grant each other "coda", keep working."""
import pathlib
import shutil

import grpc
import pytest

from walle.device_host.identity import device_info
from walle.device_host.sync import TaskStore, TaskSync
from walle.device_host.tunnel import UpTunnel
from walle.platform.errors import PermissionDenied
from walle.platform.manifest import ManifestError, parse_manifest, validate_task_dir
from walle.platform.server import build_server
from walle.platform.service import Platform
from walle.protos import admin_pb2, bundle
from walle.protos.namespaces import sharing_problem, storage_scope

ROOT = pathlib.Path(__file__).resolve().parents[2]
MAIN = b"from walle import storage\n\ndef main(event):\n    return storage.get('secret')\n"


def files(name, namespace="", members=()):
    toml = f'name = "{name}"\nentry = "main.py"\napis = ["storage"]\n'
    if namespace:
        toml += f'namespace = "{namespace}"\n'
    if members:
        toml += "namespace_members = [" + ", ".join(f'"{m}"' for m in members) + "]\n"
    return {"task.toml": toml.encode(), "main.py": MAIN}


@pytest.fixture
def platform(tmp_path):
    p = Platform(tmp_path / "platform")
    server, port, stop = build_server(p, port=0)
    p.address = f"127.0.0.1:{port}"
    yield p
    stop(0)


def submit(platform, f):
    return platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(f), author="t"))


def test_manifest_members_are_validated_and_round_trip():
    base = 'name = "coda_filter"\nentry = "main.py"\n'
    m = parse_manifest(base + 'namespace = "coda"\nnamespace_members = ["coda_train", "coda_filter"]\n')
    assert m.namespace_members == ("coda_filter", "coda_train") and m.storage_namespace == "coda"
    assert parse_manifest(m.to_toml()) == m
    assert m.__class__.from_proto(m.to_proto()) == m
    for bad, why in [('namespace_members = ["coda_filter"]\n', "needs a namespace"),
                     ('namespace = "coda"\nnamespace_members = ["coda_train"]\n', "include this task"),
                     ('namespace = "coda"\nnamespace_members = ["Bad Name", "coda_filter"]\n', "not a task name"),
                     ('namespace = "coda"\nnamespace_members = "coda_filter"\n', "list of task names")]:
        with pytest.raises(ManifestError, match=why):
            parse_manifest(base + bad)


def test_the_rule_needs_both_sides_and_covers_derived_scopes():
    a = parse_manifest('name = "a_b"\nentry = "m.py"\n')
    b = parse_manifest('name = "a-b"\nentry = "m.py"\n')            # same derived scope "a_b"
    assert storage_scope(a) == storage_scope(b) == "a_b"
    assert "a_b" in sharing_problem(b, [a])
    victim = parse_manifest('name = "victim"\nentry = "m.py"\n')
    thief = parse_manifest('name = "thief"\nentry = "m.py"\nnamespace = "victim"\nnamespace_members = ["thief", "victim"]\n')
    assert "'victim' lists []" in sharing_problem(thief, [victim])
    coda = [parse_manifest((ROOT / "tasks" / t / "task.toml").read_text())
            for t in ("coda_filter", "coda_train", "coda_infer", "coda_samples", "coda_fetch")]
    assert all(sharing_problem(m, coda) is None for m in coda)


def test_submit_refuses_a_task_claiming_another_tasks_namespace(platform, tmp_path):
    for t in ("coda_filter", "coda_train", "coda_infer"):   # the CoDA tasks grant each other "coda"
        _m, f = validate_task_dir(ROOT / "tasks" / t)
        submit(platform, f)
    with pytest.raises(PermissionDenied, match="'thief' would share storage namespace 'coda' with task 'coda_"):
        submit(platform, files("thief", "coda", ["thief", "coda_filter", "coda_train", "coda_infer"]))
    submit(platform, files("victim"))
    with pytest.raises(PermissionDenied, match="namespace 'victim'"):
        submit(platform, files("thief", "victim", ["thief", "victim"]))
    with pytest.raises(PermissionDenied, match="namespace 'victim'"):
        submit(platform, files("victim_x", "victim", ["victim", "victim_x"]))
    assert {t.name for t in platform.repo.list_tasks()} == {"coda_filter", "coda_train", "coda_infer", "victim"}


def test_device_refuses_to_install_a_claim_the_platform_let_through(platform, tmp_path):
    """A platform whose repository predates the rule (the thief was committed first, then the victim):
    the device still refuses the task that is not granted, reports it, and keeps the victim's storage."""
    submit(platform, files("victim"))
    repo = platform.repo
    # Bypass the submit check the way an old platform would have: commit straight into the repository.
    with repo._lock, repo._file_lock():
        repo._commit("thief", files("thief", "victim", ["thief", "victim"]), "old platform", "t")
        repo._refresh_index()
    for t in ("victim", "thief"):
        platform.CreateRelease(admin_pb2.CreateReleaseRequest(task=t, version=repo.get(t).version))
    cred = platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="p1"))
    up = UpTunnel(tmp_path / "dev" / "tunnel.sqlite3", grpc.insecure_channel(platform.address),
                  (("authorization", f"Bearer {cred.token}"),))
    store = TaskStore(tmp_path / "dev" / "tasks")
    sync = TaskSync(store, grpc.insecure_channel(platform.address), (("authorization", f"Bearer {cred.token}"),),
                    lambda: device_info({}, "p1"), report=up.send)
    res = sync.sync_once()
    assert res.installed == [f"victim@{repo.get('victim').version}"]
    assert res.rejected == [f"thief@{repo.get('thief').version}"] and store.get("thief") is None
    assert up.flush(timeout=10)
    with platform.state.transaction() as db:
        rows = db.execute("SELECT task, status, error FROM deliveries WHERE device_id='p1'").fetchall()
    assert ("victim", "installed", "") in rows
    assert any(t == "thief" and s == "rejected" and "namespace refused" in e and "'victim' lists []" in e
               for t, s, e in rows)
    up.close()
