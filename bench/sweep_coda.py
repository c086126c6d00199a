"""Sweep CoDA's per-release config (and the demo's options) and print one table of the arms.

Each arm is a release of the CoDA tasks with `--set KEY=VALUE` overrides (task config: sigma, lr,
epochs, update_scope, reg_to_start, gate, ...) plus demo options (days, k, t, t_prime), run through
the demo's Experiment API on a subset of MovieLens users. Sweeps are releases, not code edits.

    nice -n 10 timeout 3000 .venv/bin/python bench/sweep_coda.py --users 200 --seeds 1 \\
        --arm base: --arm top:update_scope=top --arm l2:reg_to_start=1.0 --out bench-output/sweep.json

An arm is NAME:KEY=VALUE,KEY=VALUE (an empty list = the defaults). The JSON holds each arm's full
results (appended after every arm, so an interrupted sweep keeps what it ran; --resume skips arms
already in the file). `--table FILE` only prints the table of a saved sweep."""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

DEMO_OPTIONS = {"days": int, "k": int, "t": int, "t_prime": int, "max_rows": int, "global_epochs": int}
ARMS = ("cloud", "calibration", "local", "coda")


def parse_arm(text: str) -> tuple[str, dict, dict]:
    """'name:k=v,k=v' -> (name, demo options, task config)."""
    name, _, rest = text.partition(":")
    if not name:
        raise SystemExit(f"arm {text!r}: needs a name before ':'")
    demo, task = {}, {}
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        if not eq:
            raise SystemExit(f"arm {name}: {part!r} is not KEY=VALUE")
        if key in DEMO_OPTIONS:
            demo[key] = DEMO_OPTIONS[key](value)
        else:
            task[key] = value  # the release's config, validated by the platform as `--set` is
    return name, demo, task


def run_arm(name: str, demo: dict, task: dict, users: int, seeds: list[int], workers: int) -> dict:
    from rich.console import Console

    from walle.platform.coda.experiment import Config, Experiment
    with tempfile.TemporaryDirectory(prefix=f"walle-sweep-{name}-") as out:
        cfg = Config(users=users, seeds=tuple(seeds), workers=workers, task_config=task, out_dir=out, **demo)
        t0 = time.perf_counter()
        res = Experiment(cfg, Console(stderr=True, quiet=True)).run()
        res["sweep"] = {"arm": name, "demo": demo, "set": task, "wall_s": time.perf_counter() - t0}
        return res


def _mean(values):
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def row_of(res: dict) -> dict:
    """One table row: per arm the seed-mean of per-user AUC, pooled AUC and the ranking metrics that
    the results hold, plus CoDA's commit rate and the filter's keep rate."""
    seeds = list(res["seeds"].values())
    row = {"arm": res["sweep"]["arm"], "set": res["sweep"]["set"], "demo": res["sweep"]["demo"],
           "seeds": len(seeds), "users": res["users"], "wall_s": res["sweep"]["wall_s"]}
    for arm in ARMS:
        if arm not in seeds[0]:
            continue
        for metric in ("user_auc_mean", "pooled_auc", "hr@10", "ndcg@10"):
            vals = [s[arm].get(metric) for s in seeds if isinstance(s.get(arm), dict)]
            if any(v is not None for v in vals):
                row[f"{arm}.{metric}"] = _mean(vals)
    # Paired per-user differences with their bootstrap CI (the demo's evaluation: results["paired"]);
    # without them (older results) the difference of the arms' means in the same run.
    for a, b in (("coda", "cloud"), ("coda", "local"), ("coda", "calibration"), ("local", "cloud")):
        for metric, summary_key in (("auc", "user_auc_mean"), ("hr@10", "hr@10")):
            ci = res.get("paired", {}).get(f"{a}-{b}", {}).get(metric)
            if ci and ci.get("mean") is not None:
                row[f"d.{a}-{b}.{metric}"] = ci["mean"]
                row[f"ci.{a}-{b}.{metric}"] = (ci["lo"], ci["hi"])
            elif row.get(f"{a}.{summary_key}") is not None and row.get(f"{b}.{summary_key}") is not None:
                row[f"d.{a}-{b}.{metric}"] = row[f"{a}.{summary_key}"] - row[f"{b}.{summary_key}"]
    diag = [s.get("diagnostics", {}) for s in seeds]
    row["ctr.commit_rate"] = _mean([d.get("ctr", {}).get("commit_rate") for d in diag])
    row["ctr_local.commit_rate"] = _mean([d.get("ctr_local", {}).get("commit_rate") for d in diag])
    row["filter_keep_rate"] = _mean([d.get("filter_keep_rate") for d in diag])
    return row


SHORT = {"user_auc_mean": "uAUC", "pooled_auc": "pAUC", "hr@10": "HR10", "ndcg@10": "NDCG10", "auc": "uAUC",
         "calibration": "calib"}


def print_table(rows: list[dict], out=sys.stdout) -> None:
    cols = []
    for r in rows:
        for k in r:
            if "." in k and k not in cols and not k.endswith("commit_rate") and not k.startswith("ci."):
                cols.append(k)
    cols = sorted(cols, key=lambda k: (ARMS.index(k.split(".")[0]) if k.split(".")[0] in ARMS else 9, k))
    head = ["arm"] + [".".join(SHORT.get(p, p) for p in c.split(".")[-2:]) for c in cols] + \
        ["commit", "commitL", "keep", "s", "config"]
    lines = [head]
    for r in rows:
        cfg = ",".join(f"{k}={v}" for k, v in {**r["demo"], **r["set"]}.items()) or "(defaults)"
        lines.append([r["arm"]] + [_f(r.get(c)) + _ci(r.get("ci." + c[2:])) for c in cols] +
                     [_f(r.get("ctr.commit_rate"), 2), _f(r.get("ctr_local.commit_rate"), 2),
                      _f(r.get("filter_keep_rate"), 2), f"{r['wall_s']:.0f}", cfg])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(str(v).ljust(w) for v, w in zip(line, widths)), file=out)


def _ci(ci):
    return "" if not ci else f" [{ci[0]:+.4f},{ci[1]:+.4f}]"


def _f(v, digits=4):
    return "-" if v is None else f"{v:.{digits}f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arm", action="append", default=[], help="NAME:KEY=VALUE,... (repeatable)")
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=1, help="how many seeds")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds FIRST..FIRST+N-1 (add seeds to a scan)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--out", default="bench-output/sweep_coda.json")
    ap.add_argument("--resume", action="store_true", help="skip arms already in --out")
    ap.add_argument("--table", metavar="FILE[,FILE]", help="print the table of saved sweeps and exit")
    args = ap.parse_args(argv)
    if args.table:
        print_table([row_of(r["results"]) for f in args.table.split(",")
                     for r in json.loads(pathlib.Path(f).read_text())])
        return 0
    if not args.arm:
        ap.error("give at least one --arm")
    arms = [parse_arm(a) for a in args.arm]
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = json.loads(out.read_text()) if args.resume and out.exists() else []
    done = {r["row"]["arm"] for r in saved}
    for name, demo, task in arms:
        if name in done:
            continue
        print(f"== {name}: demo {demo} set {task} ({args.users} users, {args.seeds} seed(s))", file=sys.stderr)
        res = run_arm(name, demo, task, args.users, list(range(args.first_seed, args.first_seed + args.seeds)),
                      args.workers)
        saved.append({"row": row_of(res), "results": res})
        out.write_text(json.dumps(saved, indent=1, default=str))
        print_table([row_of(res)], sys.stderr)
    print_table([r["row"] for r in saved])
    return 0


if __name__ == "__main__":
    sys.exit(main())
