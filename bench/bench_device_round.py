"""One on-device CoDA round (coda_filter + coda_train through the real sandbox, one device at a
time, MovieLens users, real gRPC with TLS to a live cloud), side by side in one run:

* old: the commit before issue 11 (models, training and the gate in host code, called by the
  scripts through `model.*` ops), run from a temporary git worktree of that commit;
* any `--also REV` commits (e.g. the commit a change started from), the same way;
* new: this checkout (models trained in the sandboxed child from the task library; the host
  store only moves parameter blobs).

Each side runs in its own process (PYTHONPATH puts that side's `walle` first, and its sandbox
zygote runs that side's code too) and prints JSON: round wall time (median, p90), round CPU time
(user + sys: on the device, i.e. the task children plus the device host's work for the runs, and of
the whole process, which also serves the in-process cloud; less noisy than wall time on a shared
machine), the child's peak memory and the zygote's RSS it
forked from, bytes crossing the host-child channel per round (all frames, and the `model.*` ops'
share), and the demo's held-out AUCs for the same users. The load average is printed with it."""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
OLD_COMMIT = "11810cd"  # main before issue 11 (host-side models)


def measure(users: int, days: int) -> dict:
    """Runs inside one side's process."""
    from rich.console import Console

    from walle.device_host import hostapi
    from walle.device_host.host import DeviceHost
    from walle.device_host.sandbox import Sandbox, protocol, runner
    from walle.platform.coda.experiment import Config, Experiment

    if os.environ.get("WALLE_BENCH_PKG"):
        side_zygote(runner, os.environ["WALLE_BENCH_PKG"])
    counts = {"frames_bytes": 0, "model_op_bytes": 0}
    send, recv_exact, call = protocol.Channel.send_bytes, protocol.Channel._recv_exact, hostapi.HostAPI.__call__

    def send_bytes(self, payload, deadline=None):
        counts["frames_bytes"] += len(payload) + 4
        return send(self, payload, deadline)

    def recv(self, n, deadline):
        counts["frames_bytes"] += n
        return recv_exact(self, n, deadline)

    def api_call(self, op, args, kwargs):
        out = call(self, op, args, kwargs)
        if op.startswith("model."):
            counts["model_op_bytes"] += len(protocol.encode([args, kwargs])) + len(protocol.encode(out))
        return out

    protocol.Channel.send_bytes, protocol.Channel._recv_exact, hostapi.HostAPI.__call__ = send_bytes, recv, api_call
    cpu = round_cpu(runner, DeviceHost, Experiment)
    zygote_mb = zygote_rss_mb(Sandbox)
    fields = Config.__dataclass_fields__
    kw = {"model_workers": 0} if "model_workers" in fields else {}  # old: model ops in the host, as on a phone
    with tempfile.TemporaryDirectory() as out:
        exp = Experiment(Config(users=users, days=days, workers=1, out_dir=out, **kw), Console(stderr=True, quiet=True))
        res = exp.run()
    seed = res["seeds"]["0"]
    c = seed["cost"]
    rounds = users * (days - 1)
    return {"wall_p50_s": c["round_wall_s_p50"], "wall_p90_s": c["round_wall_s_p90"],
            "device_cpu_p50_s": statistics.median(cpu["device"]), "child_cpu_p50_s": statistics.median(cpu["child"]),
            "process_cpu_p50_s": statistics.median(cpu["process"]),
            "child_peak_mb": c["sandbox_peak_memory_mb"], "zygote_rss_mb": zygote_mb,
            "host_extra_rss_mb_p50": c["round_extra_rss_mb_p50"], "task_runs": c["task_runs"],
            "failed": c["task_runs_failed"], "channel_kb_per_round": counts["frames_bytes"] / 1024 / rounds,
            "model_op_kb_per_round": counts["model_op_bytes"] / 1024 / rounds,
            "pooled_auc": {arm: seed[arm]["pooled_auc"] for arm in ("cloud", "local", "coda")}}


def round_cpu(runner, host_cls, experiment_cls) -> dict:
    """CPU (user + sys) of each device-day's round, less the home-page run that closes it:
    * device: the task children's (the zygote's wait4) plus the device host's work for the runs (the
      thread that runs them: host API, conversation, report; and the host API ops' own threads);
    * process: the children's plus this whole process's (the device host, the in-process cloud
      serving it, gRPC's threads). One device at a time, so the process's CPU in the window is the round's."""
    out = {"device": [], "process": [], "child": []}
    local = threading.local()
    reap, run, device_day = runner.Sandbox._reap, host_cls._run, experiment_cls._device_day

    def reap_cpu(z, pid):
        got = reap(z, pid)
        local.child = getattr(local, "child", 0.0) + float(got.get("cpu_s", 0.0))
        return got

    def run_cpu(self, name, *args, **kwargs):
        c0, t0, p0 = getattr(local, "child", 0.0), time.thread_time(), time.process_time()
        got = run(self, name, *args, **kwargs)
        child, mine = local.child - c0, time.thread_time() - t0 + float(getattr(got[0], "host_cpu_s", 0.0))
        if name == "coda_infer":  # the home page, not part of the round
            local.skip = getattr(local, "skip", 0.0) + child + time.process_time() - p0
            local.child = c0
        else:
            local.device = getattr(local, "device", 0.0) + child + mine
        return got

    def day_cpu(self, *args, **kwargs):
        local.child, local.skip, local.device, p0 = 0.0, 0.0, 0.0, time.process_time()
        try:
            return device_day(self, *args, **kwargs)
        finally:
            if local.device > 0.005:  # a day without a round (the old code's day 1) costs next to nothing
                out["device"].append(local.device)
                out["process"].append(local.child + time.process_time() - p0 - local.skip)
                out["child"].append(local.child)

    runner.Sandbox._reap, host_cls._run, experiment_cls._device_day = staticmethod(reap_cpu), run_cpu, day_cpu
    return out


def side_zygote(runner, pkg: str) -> None:
    """The sandbox zygote starts with `python -I` (no PYTHONPATH): make it import this side's walle."""
    popen = runner.subprocess.Popen
    boot = (f"import sys, runpy; sys.path.insert(0, {pkg!r}); "
            "runpy.run_module('walle.device_host.sandbox.zygote', run_name='__main__')")

    def side_popen(args, *a, **kw):
        if list(args[1:4]) == ["-I", "-m", "walle.device_host.sandbox.zygote"]:
            args = [args[0], "-I", "-c", boot, *args[4:]]
        return popen(args, *a, **kw)
    runner.subprocess.Popen = side_popen


def zygote_rss_mb(sandbox_cls) -> float:
    """RSS of a warmed-up zygote (the baseline a child's peak is above)."""
    with sandbox_cls(workers=1) as sb:
        sb.run({"main.py": "def main(event):\n    return 1\n"}, "main.py", {})
        me = str(os.getpid())
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if pid.isdigit() and f.read().rsplit(")", 1)[1].split()[1] == me:
                        with open(f"/proc/{pid}/status") as g:
                            return next(int(line.split()[1]) / 1024 for line in g if line.startswith("VmRSS:"))
            except (OSError, StopIteration, IndexError):
                continue
    return 0.0


def run_side(pythonpath: str | None, users: int, days: int) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
        env["WALLE_BENCH_PKG"] = pythonpath
    out = subprocess.run([sys.executable, __file__, "--side", "--users", str(users), "--days", str(days)],
                         env=env, capture_output=True, text=True, check=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def side_package(tmp: pathlib.Path, rev: str) -> str:
    """A git worktree of `rev` and a `walle` folder linking its packages."""
    tree = tmp / rev / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev],
                   check=True, capture_output=True)
    pkg = tmp / rev / "pkg" / "walle"
    pkg.mkdir(parents=True)
    for part in ("platform", "device_host", "protos", "tasks"):
        (pkg / part).symlink_to(tree / part)
    return str(tmp / rev / "pkg")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--days", type=int, default=3)
    ap.add_argument("--also", action="append", default=[], metavar="REV",
                    help="also measure this commit (e.g. where a change started), between old and new")
    ap.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(measure(args.users, args.days)))
        return
    loads = [load_average()]
    sides: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, rev in [(f"old {OLD_COMMIT}", OLD_COMMIT)] + [(f"at {r}", r) for r in args.also]:
            try:
                sides.append((label, run_side(side_package(pathlib.Path(tmp), rev), args.users, args.days)))
            finally:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                                str(pathlib.Path(tmp) / rev / "tree")], capture_output=True)
            loads.append(load_average())
    sides.append(("new (this checkout)", run_side(None, args.users, args.days)))
    loads.append(load_average())
    rows = [("round wall, median", "wall_p50_s", "{:.3f} s", "<= 0.2 s"),
            ("round wall, p90", "wall_p90_s", "{:.3f} s", ""),
            ("round CPU on the device, median", "device_cpu_p50_s", "{:.3f} s", ""),
            ("  task children, median", "child_cpu_p50_s", "{:.3f} s", ""),
            ("round CPU, whole process, median", "process_cpu_p50_s", "{:.3f} s", ""),
            ("child peak memory", "child_peak_mb", "{:.0f} MB", ""),
            ("zygote RSS (fork base)", "zygote_rss_mb", "{:.0f} MB", ""),
            ("host process extra RSS, median", "host_extra_rss_mb_p50", "{:.1f} MB", ""),
            ("host<->child channel per round", "channel_kb_per_round", "{:.1f} KB", ""),
            ("  of which model.* ops", "model_op_kb_per_round", "{:.1f} KB", ""),
            ("task runs (failed)", "task_runs", "{}", "")]
    print(f"{args.users} MovieLens users x {args.days - 1} device days, one device at a time; "
          f"load average (1/5/15 min) before and after each side: {' | '.join(loads)}")
    print(f"{'measure':38s}" + "".join(f"{label:>22s}" for label, _ in sides) + "  target")
    for label, key, fmt, target in rows:
        cells = [f"{v['task_runs']} ({v['failed']})" if key == "task_runs" else
                 (fmt.format(v[key]) if v.get(key) is not None else "n/a") for _, v in sides]
        print(f"{label:38s}" + "".join(f"{c:>22s}" for c in cells) + f"  {target}")
    extra = [v["child_peak_mb"] - v["zygote_rss_mb"] for _, v in sides]
    print(f"{'child peak above the zygote':38s}" + "".join(f"{e:>19.0f} MB" for e in extra) + "  <= 60 MB")
    for arm in ("cloud", "local", "coda"):
        print(f"{'pooled test AUC, ' + arm:38s}" + "".join(f"{v['pooled_auc'][arm]:>22.4f}" for _, v in sides))


if __name__ == "__main__":
    main()
