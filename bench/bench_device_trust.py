"""Issue 9 figures: server RSS after ten 20 MB DeviceInfo requests, and reports stored after a
device reset (data folder wiped, re-enrolled under the same id).

Runs a real platform server in a child process (its RSS is read from /proc) and real device-side
up tunnels. Run it on two checkouts to compare (the numbers printed are this checkout's):
    .venv/bin/python bench/bench_device_trust.py
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

SERVE = """
import sys
from walle.platform.server import build_server
from walle.platform.service import Platform
p = Platform(sys.argv[1])
_s, port, stop = build_server(p, port=0)
print(port, flush=True)
sys.stdin.read()
stop(0)
"""


def rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--mb", type=int, default=20)
    args = ap.parse_args()
    import grpc

    from walle.device_host.tunnel import UpTunnel
    from walle.platform.auth import bearer_metadata
    from walle.platform.service import Platform
    from walle.protos import admin_pb2, device_pb2, device_pb2_grpc

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="walle-bench-trust-"))
    data = tmp / "data"
    admin = Platform(data)  # enrolls through the data folder, as `walle device enroll --data-dir` does
    token = admin.EnrollDevice(admin_pb2.EnrollRequest(device_id="big")).token
    server = subprocess.Popen([sys.executable, "-c", SERVE, str(data)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        port = int(server.stdout.readline())
        opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
            stub = device_pb2_grpc.DeviceServiceStub(ch)
            md = bearer_metadata(token)
            stub.GetActiveTasks(device_pb2.DeviceInfo(os="android"), metadata=md, timeout=30)
            before = rss_mb(server.pid)
            refused = 0
            for i in range(args.requests):
                info = device_pb2.DeviceInfo(os="android", app_version=str(i) * (args.mb << 20))
                try:
                    stub.GetActiveTasks(info, metadata=md, timeout=60)
                except grpc.RpcError:
                    refused += 1
            time.sleep(11)  # the server flushes (and trims after refusing a huge request) every 5 s
            after = rss_mb(server.pid)
            print(f"server RSS: {before:.0f} MB before, {after:.0f} MB after {args.requests} DeviceInfos of "
                  f"{args.mb} MB (+{after - before:.0f} MB); {refused} refused")

            # A device sends 7 reports, its data folder is wiped, it is enrolled again and sends 7 more.
            dev = tmp / "device"
            stored = []
            for life in (1, 2):
                tok = admin.EnrollDevice(admin_pb2.EnrollRequest(device_id="reset")).token
                up = UpTunnel(dev / "tunnel.sqlite3", ch, bearer_metadata(tok))
                for i in range(7):
                    up.send("event", {"life": life, "i": i})
                up.flush(timeout=30)
                up.close()
                shutil.rmtree(dev)
                stored.append(admin.state.db.execute("SELECT COUNT(*) FROM events WHERE device_id='reset'").fetchone()[0])
            print(f"device reset: 14 records sent (7 per life), {stored[-1]} stored "
                  f"({stored[0]} after the first life)")
            print(json.dumps({"rss_before_mb": round(before), "rss_after_mb": round(after), "refused": refused,
                              "reset_sent": 14, "reset_stored": stored[-1]}))
    finally:
        server.stdin.close()
        server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
