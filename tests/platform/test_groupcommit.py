"""Group commit of device uploads: many devices' reports share one transaction, each caller is answered
only once its own write committed, a batch that fails stores nothing and acknowledges nothing, and a
process killed at any moment has stored everything it acknowledged."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zlib

import pytest

from walle.platform.groupcommit import GroupCommit
from walle.platform.service import Platform
from walle.platform.state import open_state
from walle.protos import admin_pb2, tunnel_pb2


def up_batch(seqs, epoch=1, topic="event"):
    recs = [tunnel_pb2.UpRecord(seq=s, topic=topic, ts_ms=1000, payload=b'{"n": %d}' % s) for s in seqs]
    return tunnel_pb2.UpBatch(zlib_records=zlib.compress(tunnel_pb2.UpRecords(records=recs).SerializeToString()),
                              count=len(recs), epoch=epoch)


def test_writes_that_arrive_together_share_a_commit_and_get_their_own_results():
    committed: list[list[int]] = []
    gate = threading.Event()

    def write_many(items):
        if not committed:
            gate.wait(10)  # the first commit is slow: everything else queues behind it
        committed.append(list(items))
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]

    gc = GroupCommit(write_many)
    results: dict[int, object] = {}

    def one(i):
        try:
            results[i] = gc.submit(i)
        except ValueError as e:
            results[i] = str(e)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    threads[0].start()
    time.sleep(0.2)  # 0 leads and waits at the gate
    for t in threads[1:]:
        t.start()
    time.sleep(0.3)
    assert results == {}  # nobody is answered before their commit
    gate.set()
    for t in threads:
        t.join(10)
    assert results == {i: (f"odd {i}" if i % 2 else i * 10) for i in range(40)}
    assert committed[0] == [0] and sorted(i for b in committed[1:] for i in b) == list(range(1, 40))
    assert len(committed) < 40 and gc.batches == len(committed) and gc.items == 40


def test_a_failed_commit_fails_every_write_of_its_batch_and_the_next_batch_goes_on():
    calls = []

    def write_many(items):
        calls.append(list(items))
        if len(calls) == 1:
            raise RuntimeError("database went away")
        return list(items)
    gc = GroupCommit(write_many)
    with pytest.raises(RuntimeError, match="went away"):
        gc.submit("a")
    assert gc.submit("b") == "b"


@pytest.fixture
def platform(tmp_path, state_url):
    p = Platform(tmp_path / "platform", state=state_url)
    yield p
    p.state.close()


def test_concurrent_uploads_are_committed_together(platform, monkeypatch):
    devices = [f"d{i}" for i in range(24)]
    for d in devices:
        platform.EnrollDevice(admin_pb2.EnrollRequest(device_id=d))
    real = platform.state.store_uploads
    sizes = []

    def slow(writes, *a):
        sizes.append(len(writes))
        time.sleep(0.05)  # a commit takes a while: uploads arriving meanwhile queue for the next
        return real(writes, *a)
    monkeypatch.setattr(platform.state, "store_uploads", slow)
    acks = {}
    threads = [threading.Thread(target=lambda d=d: acks.__setitem__(d, platform.upload(d, up_batch([1, 2, 3]))))
               for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert acks == {d: (3, 0, 3) for d in devices}
    assert sum(sizes) == len(devices) and max(sizes) > 1
    assert all([r["seq"] for r in platform.state.events(d)] == [1, 2, 3] for d in devices)
    assert platform.upload("d0", up_batch([3, 4])) == (1, 1, 4)  # re-sent seq 3 is a duplicate


def test_a_batch_that_fails_acknowledges_nothing_and_a_retry_stores_it(platform, monkeypatch):
    platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="d1"))
    real_insert = type(platform.state)._insert_new
    calls = []

    def fail_second_table(self, c, table, rows):
        calls.append(table)
        if len(calls) == 2:  # mid-transaction: the events went in, then the database fails
            raise RuntimeError("disk full")
        return real_insert(self, c, table, rows)
    monkeypatch.setattr(type(platform.state), "_insert_new", fail_second_table)
    batch = up_batch([1, 2])
    recs = tunnel_pb2.UpRecords.FromString(zlib.decompress(batch.zlib_records))
    recs.records.add(seq=3, topic="log", ts_ms=1000, payload=b"line")  # a second topic of the same table
    recs.records.add(seq=4, topic="run_report", ts_ms=1000,
                     payload=tunnel_pb2.RunReport(task="t", version="v", status="ok").SerializeToString())
    batch = tunnel_pb2.UpBatch(zlib_records=zlib.compress(recs.SerializeToString()), count=4, epoch=1)
    with pytest.raises(RuntimeError, match="disk full"):
        platform.upload("d1", batch)
    assert platform.state.events("d1") == [] and platform.state.reports("run_report") == []
    monkeypatch.undo()
    assert platform.upload("d1", batch) == (4, 0, 4)
    assert [r["seq"] for r in platform.state.events("d1")] == [1, 2, 3]


KILLED_UPLOADER = textwrap.dedent("""
    import sys, threading, zlib
    from walle.platform.service import Platform
    from walle.protos import admin_pb2, tunnel_pb2
    p = Platform(sys.argv[1])
    out_lock = threading.Lock()
    def device(i):
        d = f"d{i}"
        p.EnrollDevice(admin_pb2.EnrollRequest(device_id=d))
        for seq in range(1, 100000):
            recs = [tunnel_pb2.UpRecord(seq=seq, topic="event", ts_ms=1000, payload=b"x")]
            b = tunnel_pb2.UpBatch(zlib_records=zlib.compress(tunnel_pb2.UpRecords(records=recs).SerializeToString()),
                                   count=1, epoch=1)
            p.upload(d, b)
            with out_lock:
                sys.stdout.write(f"{d} {seq}\\n")
                sys.stdout.flush()
    for i in range(12):
        threading.Thread(target=device, args=(i,), daemon=True).start()
    threading.Event().wait(60)
""")


@pytest.mark.slow
def test_a_process_killed_mid_batch_has_stored_everything_it_acknowledged(tmp_path):
    folder = tmp_path / "platform"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_UPLOADER, str(folder)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    acked = []
    try:
        for line in proc.stdout:
            acked.append(tuple(line.split()))
            if len(acked) >= 600:  # well into the run: many batches committed, more in flight
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    for line in proc.stdout.read().splitlines():  # acknowledged before the kill landed
        if len(line.split()) == 2:
            acked.append(tuple(line.split()))
    assert len(acked) >= 600
    st = open_state(f"sqlite:///{folder / 'state.sqlite3'}")
    try:
        stored = {(r["device_id"], str(r["seq"])) for d in {a for a, _ in acked} for r in st.events(d)}
    finally:
        st.close()
    assert set(acked) <= stored
