"""One on-device CoDA round (coda_filter + coda_train through the real sandbox), as on a phone:
model ops in the host process, devices one at a time, over real gRPC with TLS to a live cloud.

Prints wall time per round (median, p90), extra peak memory of the host process during a round
(above its RSS just before), the sandboxed child's peak memory, and bytes downloaded per trigger."""
import argparse
import tempfile

from rich.console import Console

from walle.platform.coda.experiment import Config, Experiment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=40)
    ap.add_argument("--days", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as out:
        exp = Experiment(Config(users=args.users, days=args.days, workers=1, model_workers=0, out_dir=out),
                         Console(stderr=True, quiet=True))
        res = exp.run()
    c = res["seeds"]["0"]["cost"]
    n = sum(1 for _ in range(args.users)) * (args.days - 1)
    print(f"{n} device rounds ({args.users} users x {args.days - 1} days), {c['task_runs']} task runs, "
          f"{c['task_runs_failed']} failed")
    print(f"round wall time: median {c['round_wall_s_p50'] * 1000:.0f} ms, p90 {c['round_wall_s_p90'] * 1000:.0f} ms "
          f"(target <= 200 ms; paper 700 ms on a phone)")
    print(f"host process extra peak memory per round: median {c['round_extra_rss_mb_p50']:.1f} MB, "
          f"max {c['round_extra_rss_mb_max']:.1f} MB; sandboxed task peak {c['sandbox_peak_memory_mb']:.0f} MB "
          f"(target <= 60 MB above the host's baseline; paper 120 MB)")
    print(f"downloaded per trigger: {c['kb_per_trigger']:.2f} KB over {c['batches_pulled']} batches "
          f"(target <= 8 KB; paper 19.4 KB)")


if __name__ == "__main__":
    main()
