"""Ask latency of the app interface: a 20-candidate home page ranked by coda_infer on a device host.

Side by side in one run:
  socket     the app asks over gRPC on the Unix socket (`AppClient.ask`, as `walle device ask` does)
  embedded   the app hosts the device in-process (`Device.ask`)
  emit+run   the previous way (the demo before issue 12): emit `page_view:home` and wait for the run;
             the result never reaches the app
  during training   socket asks while coda_train-like training holds M (served from M0 when locked)
Prints p50/p99 in ms. coda_infer runs the DIN of the task library (tasks/_lib/coda) in the sandbox;
the training thread trains the same library's DIN and commits through the model store."""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import threading
import time

import numpy as np

from walle.device_host.app import AppClient, Device
from walle.device_host.identity import Credentials
from walle.device_host.models import blob
from walle.device_host.sandbox import Sandbox
from walle.platform.coda.global_model import train_global
from walle.platform.coda.tasklib import coda_module
from walle.platform.demo import tasks_dir
from walle.platform.manifest import validate_task_dir
from walle.platform.server import build_server
from walle.platform.service import Platform
from walle.protos import admin_pb2, bundle

N_ITEMS, N_CATS, HIST = 500, 8, 50


def sample(rng, item: int, hist: list[int], label: float = 0.0) -> dict:
    return {"item_id": item, "item_cats": [1 + item % N_CATS], "hist_items": hist,
            "hist_cats": [1 + h % N_CATS for h in hist], "profile": [], "label": label}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q))


def line(name: str, values: list[float]) -> str:
    return f"{name:<22} n={len(values):<4} p50 {pct(values, 50):7.1f} ms   p99 {pct(values, 99):7.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--asks", type=int, default=200)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-ask-") as tmp:
        tmp = pathlib.Path(tmp)
        platform = Platform(tmp / "platform")
        _server, port, stop = build_server(platform, port=0)
        _m, files = validate_task_dir(tasks_dir() / "coda_infer")
        tv = platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), author="bench"))
        platform.CreateRelease(admin_pb2.CreateReleaseRequest(task="coda_infer", version=tv.version, rule="true"))
        token = platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="bench-1")).token
        sandbox = Sandbox(workers=2)
        dev = Device(tmp / "d", f"127.0.0.1:{port}", attrs={"user_id": "u1"}, sandbox=sandbox,
                     credentials=Credentials("bench-1", token), serve_socket=True)
        try:
            dev.start(watch=False)
            pool = [sample(rng, int(rng.integers(1, N_ITEMS)), [int(h) for h in rng.integers(1, N_ITEMS, HIST)],
                           float(rng.random() < 0.4)) for _ in range(400)]
            data, _metrics = train_global(pool, epochs=1, seed=0, catalog={"n_items": N_ITEMS, "n_cats": N_CATS + 1})
            store = dev.host.models.scope("coda")
            store.create("ctr", *blob.unpack(data))
            hist = [int(h) for h in rng.integers(1, N_ITEMS, HIST)]

            def page() -> dict:
                return {"candidates": [sample(rng, int(i), hist) for i in rng.choice(N_ITEMS - 1, 20, replace=False) + 1]}

            results = {}
            with AppClient(tmp / "d") as app:
                for _ in range(10):  # warm up: zygote, model cache
                    app.ask("page_view:home", page())
                # interleaved, so load on the shared machine hits the three ways alike
                ways = {
                    "socket": lambda p: app.ask("page_view:home", p),
                    "embedded": lambda p: dev.ask("page_view:home", p),
                    "emit+run (old way)": lambda p: (dev.host.emit("page_view:home", p),
                                                     dev.host.triggers.wait_idle(60)),
                }
                results = {name: [] for name in ways}
                for _ in range(args.asks):
                    for name, fn in ways.items():
                        p = page()
                        t0 = time.perf_counter()
                        fn(p)
                        results[name].append(time.perf_counter() - t0)

                stop_training = threading.Event()

                din, features, training = (coda_module(m) for m in ("din", "features", "training"))

                def train() -> None:  # what coda_train does: begin an update, train, commit under the lock
                    while not stop_training.is_set():
                        got = store.begin_update("ctr")
                        net = din.DIN(got["meta"]["config"])
                        net.set_params(got["params"])
                        training.train(net, features.batch(pool[:300], HIST), 1, 0.005, 0)
                        store.commit("ctr", net.params(), got["meta"], got["version"])
                trainer = threading.Thread(target=train, daemon=True)
                trainer.start()
                t, served = [], {}
                for _ in range(max(40, args.asks // 4)):
                    p = page()
                    t0 = time.perf_counter()
                    r = app.ask("page_view:home", p)
                    t.append(time.perf_counter() - t0)
                    src = json.loads(r.result_json)["served_from"]
                    served[src] = served.get(src, 0) + 1
                stop_training.set()
                trainer.join()
                results["socket, during training"] = t
            print(f"ask latency, 20-candidate home page ranked by coda_infer (DIN, history {HIST}); "
                  f"2 shared cores, loaded machine")
            for name, values in results.items():
                print(line(name, values))
            print(f"during training served from: {served}")
            print(f"mean socket overhead vs embedded: "
                  f"{(statistics.mean(results['socket']) - statistics.mean(results['embedded'])) * 1000:.1f} ms")
        finally:
            dev.close()
            sandbox.close()
            stop(0)


if __name__ == "__main__":
    main()
