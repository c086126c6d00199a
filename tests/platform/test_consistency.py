"""Consistency under races and crashes (issue 9, item 6): submits are audited or taken back, scripts
that cannot run are refused at submit, rollbacks decide inside their transaction, and what devices
fall back to is explicit and never a version that was rolled back."""
import json
import pathlib
import shutil
import subprocess
import sys
import textwrap
import threading

import pytest

from walle.platform import errors
from walle.platform.manifest import validate_task_dir
from walle.platform.service import Platform
from walle.protos import admin_pb2, bundle

ROOT = pathlib.Path(__file__).resolve().parents[2]


def release(p, task, version="", **kw):
    return p.CreateRelease(admin_pb2.CreateReleaseRequest(task=task, version=version, has_rollout="rollout" in kw, **kw))


def archive(src: pathlib.Path) -> bytes:
    return bundle.pack(validate_task_dir(src)[1])


def hello_with(tmp_path, name: str, main: str) -> pathlib.Path:
    dst = tmp_path / name
    shutil.copytree(ROOT / "tasks" / "hello", dst)
    (dst / "main.py").write_text(main)
    return dst


def actions(p):
    return [(e.action, e.target) for e in p.GetAudit(admin_pb2.AuditRequest(limit=1000)).entries]


@pytest.mark.parametrize("main,needle", [
    ("import os\n\ndef main(event):\n    return os.getcwd()\n", "module 'os' is not available in the sandbox"),
    ("from numpy import load\n\ndef main(event):\n    return 1\n", "cannot import name 'load' from 'numpy'"),
    ("import numpy.ctypeslib\n\ndef main(event):\n    return 1\n", "'numpy.ctypeslib' is not available"),
    ("from . import helpers\n\ndef main(event):\n    return 1\n", "relative imports"),
    ("import math\n\ndef run(event):\n    return math.pi\n", "does not define main(event)"),
    ("def main(event):\n    return eval('1')\n", "would not compile in the device sandbox"),
])
def test_submit_refuses_scripts_the_sandbox_would_not_run(tmp_path, main, needle):
    p = Platform(tmp_path / "data")
    good = p.SubmitTask(admin_pb2.SubmitTaskRequest(archive=archive(ROOT / "tasks" / "hello"), author="op"))
    with pytest.raises(errors.InvalidArgument) as e:
        p.SubmitTask(admin_pb2.SubmitTaskRequest(archive=archive(hello_with(tmp_path, "bad", main)), author="op"))
    assert needle in e.value.message
    assert [v.version for v in p.GetTaskHistory(admin_pb2.TaskRef(name="hello")).versions] == [good.version]


def test_submit_accepts_what_the_sandbox_runs(tmp_path):
    p = Platform(tmp_path / "data")
    src = hello_with(tmp_path, "ok", "import numpy as np\nfrom numpy import linalg\nimport json, math, random\n"
                                     "from walle import log, storage\nimport helpers\n\n"
                                     "def main(event):\n    return helpers.x + float(np.zeros(1).sum())\n")
    (src / "helpers.py").write_text("x = 1\n")
    tv = p.SubmitTask(admin_pb2.SubmitTaskRequest(archive=archive(src), author="op"))
    assert ("task.submit", f"hello@{tv.version}") in actions(p)


def test_a_submit_whose_audit_fails_leaves_no_version(tmp_path, monkeypatch):
    p = Platform(tmp_path / "data")
    v1 = p.SubmitTask(admin_pb2.SubmitTaskRequest(archive=archive(ROOT / "tasks" / "hello"), author="op"))

    def disk_full(*_a, **_k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(p.repo.journal, "confirm", disk_full)
    with pytest.raises(OSError):
        p.SubmitTask(admin_pb2.SubmitTaskRequest(archive=archive(hello_with(tmp_path, "v2", "def main(e):\n    return 2\n")),
                                                 author="op"))
    assert [v.version for v in p.GetTaskHistory(admin_pb2.TaskRef(name="hello")).versions] == [v1.version]
    assert [a for a, _ in actions(p)].count("task.submit.rolled_back") == 1
    assert p.state.pending_submits() == []
    fresh = Platform(tmp_path / "data")  # another process sees the same single version
    assert [v.version for v in fresh.GetTaskHistory(admin_pb2.TaskRef(name="hello")).versions] == [v1.version]


CRASH = textwrap.dedent("""
    import os, sys
    from walle.platform.service import Platform
    from walle.protos import admin_pb2
    p = Platform(sys.argv[1])
    def die(*a, **k):
        os._exit(9)  # killed between the git commit and its confirmation
    p.repo.journal.confirm = die
    p.SubmitTask(admin_pb2.SubmitTaskRequest(archive=open(sys.argv[2], "rb").read(), author="op"))
""")


def test_a_submit_killed_before_its_confirmation_never_becomes_releasable(tmp_path):
    data = tmp_path / "data"
    p = Platform(data)
    v1 = p.SubmitTask(admin_pb2.SubmitTaskRequest(archive=archive(ROOT / "tasks" / "hello"), author="op"))
    arc = tmp_path / "v2.tar"
    arc.write_bytes(archive(hello_with(tmp_path, "v2", "def main(e):\n    return 2\n")))
    proc = subprocess.run([sys.executable, "-c", CRASH, str(data), str(arc)], capture_output=True, timeout=120)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    orphan = p.repo._head_sha()
    assert orphan != v1.version  # the commit was made...
    with pytest.raises(errors.FailedPrecondition, match="still being submitted"):
        release(p, "hello", orphan)  # ...but cannot be released while unconfirmed
    fresh = Platform(data)  # the next open settles the dead submit: the commit is taken back, on the record
    assert [v.version for v in fresh.GetTaskHistory(admin_pb2.TaskRef(name="hello")).versions] == [v1.version]
    assert ("task.submit.rolled_back", f"hello@{orphan}") in actions(fresh)
    with pytest.raises(errors.NotFound):
        release(p, "hello", orphan)
    v2 = fresh.SubmitTask(admin_pb2.SubmitTaskRequest(archive=arc.read_bytes(), author="op"))  # the retry works
    assert v2.created and ("task.submit", f"hello@{v2.version}") in actions(fresh)


def _two_versions(tmp_path, p):
    v1 = p.SubmitTask(admin_pb2.SubmitTaskRequest(archive=archive(ROOT / "tasks" / "hello"), author="op"))
    v2 = p.SubmitTask(admin_pb2.SubmitTaskRequest(
        archive=archive(hello_with(tmp_path, "v2", "def main(e):\n    return 2\n")), author="op"))
    return v1, v2


def device(**kw):
    from walle.protos import device_pb2
    return device_pb2.DeviceInfo(host_version="0.1.0", **kw)


def got(p, device_id="d1"):
    return [t.version for t in p.active_tasks(device_id, device()).tasks]


def test_fallbacks_are_listed_and_controllable(tmp_path):
    p = Platform(tmp_path / "data")
    p.EnrollDevice(admin_pb2.EnrollRequest(device_id="d1"))
    v1, v2 = _two_versions(tmp_path, p)
    full = release(p, "hello", v1.version)
    canary = release(p, "hello", v2.version, rollout=10.0)
    listed = {r.id: r.state for r in p.ListReleases(admin_pb2.ReleaseFilter(active_only=True)).releases}
    assert listed == {canary.id: "active", full.id: "fallback"}
    p.RevokeRelease(admin_pb2.ReleaseRef(id=canary.id))
    listed = {r.id: r.state for r in p.ListReleases(admin_pb2.ReleaseFilter(active_only=True)).releases}
    assert listed == {full.id: "active"}  # what every device now gets is listed as active
    assert got(p) == [v1.version]
    p.PauseRelease(admin_pb2.ReleaseRef(id=full.id))  # and can be paused...
    assert got(p) == []
    p.ResumeRelease(admin_pb2.ReleaseRef(id=full.id))
    assert got(p) == [v1.version]
    p.RevokeRelease(admin_pb2.ReleaseRef(id=full.id))  # ...and revoked
    assert got(p) == [] and p.ListReleases(admin_pb2.ReleaseFilter(active_only=True)).releases == []


def test_pausing_a_rollback_never_reships_what_it_rolled_back(tmp_path):
    p = Platform(tmp_path / "data")
    p.EnrollDevice(admin_pb2.EnrollRequest(device_id="d1"))
    v1, v2 = _two_versions(tmp_path, p)
    r1 = release(p, "hello", v1.version)
    r2 = release(p, "hello", v2.version)
    rb = p.Rollback(admin_pb2.RollbackRequest(task="hello"))
    assert got(p) == [v1.version]
    assert p.GetRelease(admin_pb2.ReleaseRef(id=r2.id)).state == "revoked"
    p.PauseRelease(admin_pb2.ReleaseRef(id=rb.id))
    assert got(p) == [v1.version]  # the fallback is r1 (v1), never the bad v2
    assert p.GetRelease(admin_pb2.ReleaseRef(id=r1.id)).state == "active"


def test_rollback_decides_inside_its_transaction(tmp_path):
    """Operator A rolls back while operator B (another process on the same folder) releases a new
    version: B's release waits for A's decision, so A never supersedes a release it did not see."""
    data = tmp_path / "data"
    a = Platform(data)
    v1, v2 = _two_versions(tmp_path, a)
    v3 = a.SubmitTask(admin_pb2.SubmitTaskRequest(
        archive=archive(hello_with(tmp_path, "v3", "def main(e):\n    return 3\n")), author="op"))
    release(a, "hello", v1.version)
    bad = release(a, "hello", v2.version)
    b = Platform(data)
    b_release = {}
    real_get = a.releases.repo.get

    def get_then_race(*args, **kw):  # A has decided its target; B tries to release v3 right now
        if not b_release:
            t = threading.Thread(target=lambda: b_release.setdefault("r", release(b, "hello", v3.version)))
            b_release["thread"] = t
            t.start()
            t.join(timeout=1.0)
        return real_get(*args, **kw)
    a.releases.repo.get = get_then_race
    rb = a.Rollback(admin_pb2.RollbackRequest(task="hello"))
    b_release["thread"].join(timeout=60)
    newer = b_release["r"]
    assert f"rollback of {bad.id}" in rb.note
    states = {r.id: r.state for r in a.ListReleases(admin_pb2.ReleaseFilter(task="hello")).releases}
    assert states[newer.id] == "active" and states[rb.id] == "fallback"  # B's release came after, intact
    assert newer.id > rb.id or int(newer.id[1:]) > int(rb.id[1:])
    assert json.loads([e for e in a.GetAudit(admin_pb2.AuditRequest()).entries
                       if e.target == newer.id and e.action == "release.create"][0].detail)["version"] == v3.version
