"""Stateless serving replicas (issue 14): two `walle platform serve` processes, each with its own
scratch folder and nothing on disk in common, serve one fleet from one PostgreSQL (and, for CoDA,
one Redis). A release made through either reaches a device watching the other, and the device
downloads the bundle from the replica it talks to, though only the first one holds the task
repository. Behaviour uploaded through one replica is processed by a `walle cloud pipeline` process
of its own and the device pulls its batches through the other."""
import json
import os
import pathlib
import re
import subprocess
import sys
import time
import uuid
import zlib

import grpc
import pytest

from walle.platform.auth import bearer_metadata
from walle.platform.manifest import validate_task_dir
from walle.platform.service import Platform
from walle.protos import (admin_pb2, admin_pb2_grpc, bundle, coda_pb2, coda_pb2_grpc, device_pb2, device_pb2_grpc,
                          tunnel_pb2, tunnel_pb2_grpc)

ROOT = pathlib.Path(__file__).resolve().parents[2]


class Replica:
    def __init__(self, folder: pathlib.Path, state: str, coda_kv: str = ""):
        self.log = folder.parent / f"{folder.name}.log"
        coda = ["--coda", "--coda-kv", coda_kv] if coda_kv else ["--no-coda"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "walle.platform.cli", "--state", state, "--data-dir", str(folder),
                 "platform", "serve", "--insecure", *coda, "--host", "127.0.0.1", "--port", "0"],
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
        self.samples = coda_pb2_grpc.SampleServiceStub(self.channel)
        self.tunnel = tunnel_pb2_grpc.TunnelServiceStub(self.channel)

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


def _behaviour(user: int, n: int = 40) -> bytes:
    """One tunnel batch of a user's aggregated behaviour: two favourite shelves of a 120-book catalog."""
    logs = [coda_pb2.BehaviorLog(ts=1_700_000_000 + j * 60, item_id=1001 + (user % 4) * 30 + (j * 7) % 30,
                                 event="click" if j % 4 == 0 else "view", value=1.0) for j in range(n)]
    payload = zlib.compress(coda_pb2.BehaviorBatch(first_seq=1, logs=logs).SerializeToString())
    recs = tunnel_pb2.UpRecords(records=[tunnel_pb2.UpRecord(seq=1, topic="behavior.batch", payload=payload)])
    return tunnel_pb2.UpBatch(zlib_records=zlib.compress(recs.SerializeToString()), count=1)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_coda_behaviour_through_one_replica_batches_through_the_other(tmp_path, pg_state_url, redis_url):
    """CoDA past one machine: uploads through B, the day closed by a pipeline process with a folder
    of its own, batches pulled through A. Raw log and pseudonym key in PostgreSQL (the state's
    server), mappings and the day in Redis: no replica writes a CoDA store into its folder."""
    import pandas as pd

    from walle.platform.coda.cloud import CodaCloud
    kv = f"{redis_url}?namespace=t{uuid.uuid4().hex[:8]}:"
    boot = Platform(tmp_path / "boot", state=pg_state_url)
    op = bearer_metadata(boot.operators.create("ana"))
    catalog = pd.DataFrame({"item_id": range(1001, 1121), "categories": [f"shelf{i % 4}" for i in range(120)]})
    CodaCloud(boot, kv_url=kv).load_catalog(catalog)  # published to the shared state, as `cloud catalog load` does
    boot.state.close()
    a = Replica(tmp_path / "a", pg_state_url, coda_kv=kv)
    try:
        b = Replica(tmp_path / "b", pg_state_url, coda_kv=kv)
        try:
            mds = [bearer_metadata(a.admin.EnrollDevice(admin_pb2.EnrollRequest(device_id=f"phone-{u}", user_id=f"u{u}"),
                                                         metadata=op, timeout=30).token) for u in range(10)]
            for u, md in enumerate(mds):
                ack = b.tunnel.Upload(iter([_behaviour(u)]), metadata=md, timeout=30)
                assert ack.accepted == 40
            again = a.tunnel.Upload(iter([_behaviour(0)]), metadata=mds[0], timeout=30)
            assert (again.accepted, again.duplicates) == (0, 40)  # de-duplicated across replicas

            env = dict(os.environ, WALLE_CODA_KV=kv)
            out = subprocess.run([sys.executable, "-m", "walle.platform.cli", "--state", pg_state_url,
                                  "--data-dir", str(tmp_path / "pipeline"), "cloud", "pipeline", "--k", "4", "--json"],
                                 capture_output=True, text=True, timeout=300, env=env)
            assert out.returncode == 0, out.stderr[-2000:]
            summary = json.loads(out.stdout)
            assert summary["day"] == 1 and summary["today"] == 2 and summary["raw_rows"] == 400
            assert summary["users"] == 10 and summary["batches"] > 0

            listing = a.samples.ListBatches(coda_pb2.ListBatchesRequest(day=0), metadata=mds[3], timeout=10)
            assert listing.day == 1 and listing.today == 2 and len(listing.batches) > 0
            got = list(a.samples.PullBatches(coda_pb2.PullBatchesRequest(day=1, max_batches=2), metadata=mds[3],
                                             timeout=30))
            assert len(got) == min(2, len(listing.batches))
            from walle.platform.coda.sample_service import samples_from_batch
            samples = [x for batch in got for x in samples_from_batch(batch)]
            assert samples and all(x.day == 1 and x.item_id in range(1001, 1121) for x in samples)
            # B counts what the device pulled through A: the day's limit is shared state
            assert b.samples.ListBatches(coda_pb2.ListBatchesRequest(day=1), metadata=mds[3],
                                         timeout=10).pulled_today == len(got)
            for folder in ("a", "b", "pipeline"):
                assert not list((tmp_path / folder).rglob("raw.sqlite3")) and not list((tmp_path / folder).rglob("kv.sqlite3"))
        finally:
            b.stop()
    finally:
        a.stop()
