"""What one task can make the device host do: host CPU and RSS, bytes written, trigger-loop runs/s.

    .venv/bin/python bench/bench_host_limits.py [--profile native|android_sim] [--case NAME ...]

Each case runs in its own process (a real platform, a real DeviceHost, the real sandbox) so its peak host
RSS is its own. Figures: host CPU (this process only, not the sandbox children), host peak-RSS growth
over a warmed-up host, the run's status, bytes the task put on disk, runs per second of a trigger loop.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOML = """name = "{name}"
entry = "main.py"
apis = [{apis}]
min_host_version = "0.1.0"
[limits]
memory_mb = {memory_mb}
cpu_seconds = {cpu}
wall_seconds = {wall}
{triggers}
"""

CASES = {
    # case: (apis, memory_mb, cpu, wall, triggers, script)
    "nested_arg": ('"storage"', 1024, 20, 30, "",
                   "from walle import storage\ndef main(event):\n"
                   "    try:\n        storage.get('k', [[] for _ in range(2_700_000)])\n"
                   "    except Exception as e:\n        return str(e)[:200]\n    return 'accepted'\n"),
    "deep_result": ('"storage"', 256, 10, 30, "",
                    "def main(event):\n    x = []\n    for _ in range(985):\n        x = [x]\n    return x\n"),
    "forged_ndarray": ('"storage"', 256, 10, 30, "",
                       "def main(event):\n    return {'__ndarray__': 5, 'dtype': 'float32', 'shape': [1]}\n"),
    "surrogate_error": ('"storage"', 256, 10, 30, "",
                        "def main(event):\n    raise ValueError('bad \\ud800 value')\n"),
    "big_logs": ('"log"', 256, 10, 30, "",
                 "from walle import log\ndef main(event):\n    for i in range(1000):\n"
                 "        log.info('x' * 4000)\n    return 'done'\n"),
    "tunnel_flood": ('"tunnel"', 256, 10, 10, "",
                     "from walle import tunnel\ndef main(event):\n    n = 0\n    blob = 'x' * 200_000\n"
                     "    while True:\n        try:\n            tunnel.up('task.flood', blob)\n"
                     "        except Exception as e:\n            return [n, str(e)[:300]]\n        n += 1\n"),
    "storage_flood": ('"storage"', 256, 10, 10, "",
                      "from walle import storage\ndef main(event):\n    n = 0\n    blob = 'x' * 1_000_000\n"
                      "    while True:\n        try:\n            storage.put('k%d' % n, blob)\n"
                      "        except Exception as e:\n            return [n, str(e)[:300]]\n        n += 1\n"),
    "event_flood": ('"events"', 256, 10, 10, "",
                    "from walle import events\ndef main(event):\n    n = 0\n    blob = 'x' * 60_000\n"
                    "    while True:\n        try:\n            events.emit('nothing.listens', blob)\n"
                    "        except Exception as e:\n            return [n, str(e)[:300]]\n        n += 1\n"),
    "limit_lists": ('"storage"', 1024, 20, 30, "",
                    "from walle import storage\ndef main(event):\n"
                    "    try:\n        storage.get('k', [[1.5, 2.5, 3.5, 4.5] for _ in range(95_000)])\n"
                    "    except Exception as e:\n        return str(e)[:200]\n    return 'accepted'\n"),
    "limit_strings": ('"storage"', 1024, 20, 30, "",
                      "from walle import storage\ndef main(event):\n"
                      "    try:\n        storage.get('k', ['%d' % i for i in range(490_000)])\n"
                      "    except Exception as e:\n        return str(e)[:200]\n    return 'accepted'\n"),
    "commit_if_better": ('"model"', 512, 5, 10, "",
                         "from walle import model\ndef main(event):\n"
                         "    model.create(name='m', arch='din', seed=0, exist_ok=True)\n"
                         "    s = [{'hist_items': [1, 2, 3], 'hist_cats': [1, 1, 1], 'item_id': 1 + i % 50, 'label': i % 2}"
                         " for i in range(2000)]\n"
                         "    try:\n        return model.commit_if_better(name='m', train_samples=s, val_samples=s[:400],"
                         " epochs=20, batch_size=1)\n    except Exception as e:\n        return str(e)[:300]\n"),
    "trigger_loop": ('"events"', 64, 2, 5, '[[triggers]]\nkind = "event"\nevent = "again"\n',
                     "from walle import events\ndef main(event):\n    events.emit('again', {})\n    return 1\n"),
}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_case(name: str, profile: str) -> dict:
    from walle.device_host.host import DeviceHost
    from walle.device_host.identity import Credentials
    from walle.device_host.sandbox import Sandbox
    from walle.platform.manifest import validate_task_dir
    from walle.platform.server import build_server
    from walle.platform.service import Platform
    from walle.protos import admin_pb2, bundle

    apis, memory_mb, cpu, wall, triggers, script = CASES[name]
    tmp = Path(tempfile.mkdtemp(prefix="bench-limits-"))
    platform = Platform(tmp / "platform")
    server, port, stop = build_server(platform, port=0)
    task = name.replace("_", "")
    for tname, tapis, src_text, tr, mem, c, w in ((task, apis, script, triggers, memory_mb, cpu, wall),
                                                  ("warm", '"storage"', "def main(event):\n    return 1\n", "", 64, 2, 5)):
        src = tmp / "src" / tname
        src.mkdir(parents=True)
        (src / "task.toml").write_text(TOML.format(name=tname, apis=tapis, memory_mb=mem, cpu=c, wall=w, triggers=tr))
        (src / "main.py").write_text(src_text.replace("task.flood", f"task.{task}"))
        _m, files = validate_task_dir(src)
        tv = platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), author="bench"))
        platform.CreateRelease(admin_pb2.CreateReleaseRequest(task=tname, version=tv.version))
    token = platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="phone")).token
    sandbox = Sandbox(profile=profile)
    host = DeviceHost(tmp / "device", f"127.0.0.1:{port}", sandbox=sandbox, credentials=Credentials("phone", token))
    host.sync_now()
    for _ in range(3):
        host.run_task("warm")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    out: dict = {"case": name, "profile": profile}
    try:
        if name == "trigger_loop":
            host.start(watch=False)
            host.emit("again", {})
            time.sleep(5)
            host.stop()
            out["runs_in_5s"] = host.stats["runs"] - 3
            out["runs_per_s"] = round(out["runs_in_5s"] / 5, 1)
            host.triggers.emit("again", {})
            t = time.monotonic()
            out["drain_runs"] = host.triggers.drain(max_runs=2000)
            out["drain_s"] = round(time.monotonic() - t, 1)
        else:
            res = host.run_task(task)
            out.update(status=res.status, value=str(res.value)[:160], error=(res.error or "")[:200],
                       run_returned_s=round(time.monotonic() - t0, 2))
            if name == "commit_if_better":  # host work still going on for the run after it returned?
                ru = resource.getrusage(resource.RUSAGE_SELF)
                c0 = ru.ru_utime + ru.ru_stime
                time.sleep(10)
                ru = resource.getrusage(resource.RUSAGE_SELF)
                out["host_cpu_s_in_10s_after_run"] = round(ru.ru_utime + ru.ru_stime - c0, 2)
    except Exception as exc:  # the "before" figures: the host raised
        out["host_raised"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    out["wall_s"] = round(time.monotonic() - t0, 2)
    out["host_cpu_s"] = round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 2)
    out["host_rss_growth_mb"] = round((ru1.ru_maxrss - rss0) / 1024, 1)
    dev = tmp / "device"
    out["tunnel_pending"] = host.up.pending()
    out["tunnel_db_mb"] = round(sum(p.stat().st_size for p in dev.glob("tunnel.sqlite3*")) / 1e6, 1)
    out["storage_db_mb"] = round(sum(p.stat().st_size for p in dev.glob("storage.sqlite3*")) / 1e6, 1)
    if name == "tunnel_flood":
        ok = host.up.flush(timeout=120)
        out["flushed"] = ok
        out["tunnel_db_mb_after_flush"] = round(sum(p.stat().st_size for p in dev.glob("tunnel.sqlite3*")) / 1e6, 1)
    host.close()
    sandbox.close()
    stop(0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="native", choices=["native", "android_sim"])
    ap.add_argument("--case", action="append", choices=sorted(CASES))
    ap.add_argument("--case-timeout", type=float, default=300)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one, args.profile)))
        return
    for name in args.case or list(CASES):
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", name, "--profile", args.profile],
                                  capture_output=True, text=True, timeout=args.case_timeout, env=dict(os.environ))
        except subprocess.TimeoutExpired:  # the "before" commit_if_better: the host never gave the run back
            print(json.dumps({"case": name, "profile": args.profile, "host_still_busy_after_s": args.case_timeout}))
            continue
        line = proc.stdout.strip().splitlines()[-1:] or [f'{{"case": "{name}", "crashed": {proc.returncode}}}']
        print(line[0], flush=True)
        if proc.returncode:
            print(proc.stderr[-1500:], file=sys.stderr)


if __name__ == "__main__":
    main()
