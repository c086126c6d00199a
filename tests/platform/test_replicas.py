"""Stateless serving replicas (issue 14): two `walle platform serve` processes, each with its own
scratch folder and nothing on disk in common, serve one fleet from one PostgreSQL. A release made
through either reaches a device watching the other, and the device downloads the bundle from the
replica it talks to, though only the first one holds the task repository."""
import os
import pathlib
import re
import subprocess
import sys
import time

import grpc
import pytest

from walle.platform.auth import bearer_metadata
from walle.platform.manifest import validate_task_dir
from walle.platform.service import Platform
from walle.protos import admin_pb2, admin_pb2_grpc, bundle, device_pb2, device_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parents[2]


class Replica:
    def __init__(self, folder: pathlib.Path, state: str):
        self.log = folder.parent / f"{folder.name}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "walle.platform.cli", "--state", state, "--data-dir", str(folder),
                 "platform", "serve", "--insecure", "--no-coda", "--host", "127.0.0.1", "--port", "0"],
                # polling for revision changes effectively off: a notice on a watch stream can only
                # come from the change being pushed (LISTEN/NOTIFY)
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "WALLE_STATE_FALLBACK_POLL": "3600"})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            m = re.search(r"serving on 127\.0\.0\.1:(\d+)", self.log.read_text(errors="replace"))
            if m:
                self.port = int(m.group(1))
                break
            time.sleep(0.1)
        else:
            self.stop()
            pytest.fail(f"replica did not start: {self.log.read_text(errors='replace')[-2000:]}", pytrace=False)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)
        self.device = device_pb2_grpc.DeviceServiceStub(self.channel)

    def stop(self):
        if getattr(self, "channel", None) is not None:
            self.channel.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _hello(tmp_path, n: int) -> bytes:
    dst = tmp_path / f"hello{n}"
    dst.mkdir()
    for f in (ROOT / "tasks" / "hello").iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    (dst / "main.py").write_text((dst / "main.py").read_text() + f"\n# version {n}\n")
    return bundle.pack(validate_task_dir(dst)[1])


def _updated(replica: Replica, md, info, known: str, want: str) -> list[str]:
    """Watch the replica until it announces a revision other than `known`, then pull; repeats until
    the device's list holds `want` (the watch ends after a minute: the test fails, never hangs)."""
    stream = replica.device.WatchTasks(device_pb2.WatchRequest(device=info, known_revision=known),
                                       metadata=md, timeout=60)
    try:
        for _changed in stream:
            got = [f"{t.name}@{t.version}" for t in replica.device.GetActiveTasks(info, metadata=md, timeout=10).tasks]
            if want in got:
                return got
    finally:
        stream.cancel()
    return []


@pytest.mark.slow
@pytest.mark.postgres
def test_a_release_through_one_replica_reaches_a_device_watching_the_other(tmp_path, pg_state_url):
    boot = Platform(tmp_path / "boot", state=pg_state_url)  # the operator, made once in the shared state
    op = bearer_metadata(boot.operators.create("ana"))
    boot.state.close()
    a = Replica(tmp_path / "a", pg_state_url)  # accepts submits: holds the task repository
    try:
        b = Replica(tmp_path / "b", pg_state_url)
        try:
            assert not (tmp_path / "b" / "tasks").exists() or not any((tmp_path / "b" / "tasks").rglob("*.zip"))
            v1 = a.admin.SubmitTask(admin_pb2.SubmitTaskRequest(archive=_hello(tmp_path, 1), author="ana"),
                                    metadata=op, timeout=60)
            dev = bearer_metadata(a.admin.EnrollDevice(admin_pb2.EnrollRequest(device_id="d1"), metadata=op,
                                                       timeout=30).token)
            info = device_pb2.DeviceInfo(host_version="9.0.0")
            first = b.device.GetActiveTasks(info, metadata=dev, timeout=10)  # enrolled through A, known to B
            assert list(first.tasks) == []

            # Released through A, seen by the device watching B.
            a.admin.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=v1.version), metadata=op,
                                  timeout=30)
            assert _updated(b, dev, info, first.revision, f"hello@{v1.version}") == [f"hello@{v1.version}"]
            task = b.device.GetActiveTasks(info, metadata=dev, timeout=10).tasks[0]
            assert task.bundle_digest == v1.bundle_digest and task.manifest.entry == "main.py"
            data = b"".join(c.data for c in b.device.FetchBundle(
                device_pb2.FetchBundleRequest(digest=task.bundle_digest), metadata=dev, timeout=30))
            bundle.verify(data, task.bundle_digest)  # B served the bytes A published

            # Released through B (which has no repository), seen by a device watching A.
            v2 = a.admin.SubmitTask(admin_pb2.SubmitTaskRequest(archive=_hello(tmp_path, 2), author="ana"),
                                    metadata=op, timeout=60)
            known = a.device.GetActiveTasks(info, metadata=dev, timeout=10).revision
            stream = a.device.WatchTasks(device_pb2.WatchRequest(device=info, known_revision=known),
                                         metadata=dev, timeout=60)
            try:
                live = next(stream)  # the stream is up before the release is made
                rel = b.admin.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=v2.version),
                                            metadata=op, timeout=30)
                assert rel.bundle_digest == v2.bundle_digest and rel.created_by == "ana"
                notice = next(stream)  # pushed from B's commit through PostgreSQL to A's watcher
                assert int(notice.revision) > int(live.revision)
            finally:
                stream.cancel()
            assert [f"{t.name}@{t.version}" for t in a.device.GetActiveTasks(info, metadata=dev, timeout=10).tasks] \
                == [f"hello@{v2.version}"]
            # ...and B's own device list moved too.
            assert [t.version for t in b.device.GetActiveTasks(info, metadata=dev, timeout=10).tasks] == [v2.version]
        finally:
            b.stop()
    finally:
        a.stop()
