"""One on-device CoDA round (coda_filter + coda_train through the real sandbox, one device at a
time, MovieLens users, real gRPC with TLS to a live cloud), side by side in one run:

* old: the commit before issue 11 (models, training and the gate in host code, called by the
  scripts through `model.*` ops), run from a temporary git worktree of that commit;
* new: this checkout (models trained in the sandboxed child from the task library; the host
  store only moves parameter blobs).

Each side runs in its own process (PYTHONPATH puts that side's `walle` first) and prints JSON:
round wall time (median, p90), the child's peak memory and the zygote's RSS it forked from, bytes
crossing the host-child channel per round (all frames, and the `model.*` ops' share), and the
demo's held-out AUCs for the same users."""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
OLD_COMMIT = "11810cd"  # main before issue 11 (host-side models)


def measure(users: int, days: int) -> dict:
    """Runs inside one side's process."""
    from rich.console import Console

    from walle.device_host import hostapi
    from walle.device_host.sandbox import Sandbox, protocol
    from walle.platform.coda.experiment import Config, Experiment

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
            "child_peak_mb": c["sandbox_peak_memory_mb"], "zygote_rss_mb": zygote_mb,
            "host_extra_rss_mb_p50": c["round_extra_rss_mb_p50"], "task_runs": c["task_runs"],
            "failed": c["task_runs_failed"], "channel_kb_per_round": counts["frames_bytes"] / 1024 / rounds,
            "model_op_kb_per_round": counts["model_op_bytes"] / 1024 / rounds,
            "pooled_auc": {arm: seed[arm]["pooled_auc"] for arm in ("cloud", "local", "coda")}}


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
    out = subprocess.run([sys.executable, __file__, "--side", "--users", str(users), "--days", str(days)],
                         env=env, capture_output=True, text=True, check=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def old_package(tmp: pathlib.Path) -> str:
    """A git worktree of OLD_COMMIT and a `walle` folder linking its packages."""
    tree = tmp / "old"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), OLD_COMMIT],
                   check=True, capture_output=True)
    pkg = tmp / "pkg" / "walle"
    pkg.mkdir(parents=True)
    for part in ("platform", "device_host", "protos", "tasks"):
        (pkg / part).symlink_to(tree / part)
    return str(tmp / "pkg")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--days", type=int, default=3)
    ap.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(measure(args.users, args.days)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        try:
            old = run_side(old_package(pathlib.Path(tmp)), args.users, args.days)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(pathlib.Path(tmp) / "old")],
                           capture_output=True)
    new = run_side(None, args.users, args.days)
    rows = [("round wall, median", "wall_p50_s", "{:.3f} s", "<= 0.2 s"),
            ("round wall, p90", "wall_p90_s", "{:.3f} s", ""),
            ("child peak memory", "child_peak_mb", "{:.0f} MB", ""),
            ("zygote RSS (fork base)", "zygote_rss_mb", "{:.0f} MB", ""),
            ("host process extra RSS, median", "host_extra_rss_mb_p50", "{:.1f} MB", ""),
            ("host<->child channel per round", "channel_kb_per_round", "{:.1f} KB", ""),
            ("  of which model.* ops", "model_op_kb_per_round", "{:.1f} KB", ""),
            ("task runs (failed)", "task_runs", "{}", "")]
    print(f"{args.users} MovieLens users x {args.days - 1} device days, one device at a time")
    print(f"{'measure':34s} {'old (host models)':>20s} {'new (in sandbox)':>20s}  target")
    for label, key, fmt, target in rows:
        o, n = fmt.format(old[key]), fmt.format(new[key])
        if key == "task_runs":
            o, n = f"{old['task_runs']} ({old['failed']})", f"{new['task_runs']} ({new['failed']})"
        print(f"{label:34s} {o:>20s} {n:>20s}  {target}")
    extra = {k: v["child_peak_mb"] - v["zygote_rss_mb"] for k, v in (("old", old), ("new", new))}
    print(f"{'child peak above the zygote':34s} {extra['old']:>17.0f} MB {extra['new']:>17.0f} MB  <= 60 MB")
    for arm in ("cloud", "local", "coda"):
        print(f"{'pooled test AUC, ' + arm:34s} {old['pooled_auc'][arm]:>20.4f} {new['pooled_auc'][arm]:>20.4f}")


if __name__ == "__main__":
    main()
