"""results.png for the CoDA experiment: every metric of the results table, drawn so it cannot mislead.

Top row: each metric's value per arm (Cloud, Calibration, Local, CoDA) on an axis that starts at a
meaningful floor (AUC from 0.5, chance; logloss, HR and NDCG from 0), so bar heights compare
honestly; error bars (standard deviation over seeds) only with two or more seeds.
Bottom row, under each metric: the paired differences the table states, with a zero line and the
value written on the bar (small gaps stay small numbers, not tall bars on a cut axis):
  - per-user metrics (per-user AUC, HR@10, NDCG@10): the paired per-user differences (CoDA − Cloud,
    CoDA − Local, CoDA − Calibration, Local − Cloud) with their 95% bootstrap intervals;
  - pooled metrics (pooled AUC, logloss): each arm's difference to Cloud, paired per seed.
Titles say which way is better."""
from __future__ import annotations

import pathlib

import numpy as np

ARMS = ("cloud", "calibration", "local", "coda")
LABELS = {"cloud": "Cloud", "calibration": "Calib.", "local": "Local", "coda": "CoDA"}
COLORS = {"cloud": "#8c8c8c", "calibration": "#c9a227", "local": "#55aa99", "coda": "#3366cc"}
# metric -> (title, higher is better, axis floor, the per-user metric whose paired CIs go below, or None)
METRICS = {
    "user_auc_mean": ("per-user AUC", True, 0.5, "auc"),
    "pooled_auc": ("pooled AUC", True, 0.5, None),
    "pooled_logloss": ("pooled logloss", False, 0.0, None),
    "hr@10": ("HR@10", True, 0.0, "hr@10"),
    "ndcg@10": ("NDCG@10", True, 0.0, "ndcg@10"),
}


def figures(results: dict) -> dict:
    """metric -> arm -> {"values": per-seed values, "diff": per-seed (arm - cloud)}."""
    seeds = list(results["seeds"].values())
    out = {}
    for metric in METRICS:
        out[metric] = {}
        for arm in ARMS:
            pairs = [(s[arm][metric], s["cloud"][metric]) for s in seeds
                     if s[arm].get(metric) is not None and s["cloud"].get(metric) is not None]
            out[metric][arm] = {"values": [a for a, _ in pairs], "diff": [a - c for a, c in pairs]}
    return out


def _mean_err(values: list[float]) -> tuple[float, float | None]:
    """Mean, and the standard deviation only when there are at least two seeds."""
    if not values:
        return float("nan"), None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) >= 2 else None)


def _pair_label(pair: str) -> str:
    a, b = pair.split("-")
    return f"{LABELS[a]}\n−{LABELS[b]}"


def plot(results: dict, path: str | pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figs = figures(results)
    n_seeds = len(results["seeds"])
    paired = results.get("paired", {})
    fig, axes = plt.subplots(2, len(METRICS), figsize=(3.5 * len(METRICS), 6.8))
    x = np.arange(len(ARMS))
    for col, (metric, (title, higher, floor, per_user)) in enumerate(METRICS.items()):
        direction = "higher is better ↑" if higher else "lower is better ↓"
        top, bottom = axes[0][col], axes[1][col]
        stats = [_mean_err(figs[metric][a]["values"]) for a in ARMS]
        means = [m for m, _ in stats]
        errs = [e for _, e in stats]
        top.bar(x, [m - floor for m in means], bottom=floor, color=[COLORS[a] for a in ARMS],
                yerr=[e or 0 for e in errs] if n_seeds >= 2 else None, capsize=4)
        finite = [m for m in means if np.isfinite(m)] or [1.0]
        top.set_ylim(floor, 1.0 if higher else max(finite) * 1.25)
        top.set_title(f"{title}\n({direction})", fontsize=10)
        top.set_xticks(x, [LABELS[a] for a in ARMS], fontsize=8)
        for i, m in enumerate(means):
            top.text(i, m, f"{m:.4f}", ha="center", va="bottom", fontsize=7)
        if floor == 0.5:
            top.axhline(0.5, color="#cc4444", lw=0.8, ls=":")
        if per_user and paired:
            pairs = list(paired)
            cis = [paired[p][per_user] for p in pairs]
            dmeans = [c["mean"] if c["mean"] is not None else 0.0 for c in cis]
            lo = [d - c["lo"] if c["lo"] is not None else 0.0 for d, c in zip(dmeans, cis)]
            hi = [c["hi"] - d if c["hi"] is not None else 0.0 for d, c in zip(dmeans, cis)]
            colors = [COLORS[p.split("-")[0]] for p in pairs]
            xs = np.arange(len(pairs))
            bottom.bar(xs, dmeans, color=colors, yerr=[lo, hi], capsize=4)
            bottom.set_xticks(xs, [_pair_label(p) for p in pairs], fontsize=7)
            span = max([abs(d) + max(a, b) for d, a, b in zip(dmeans, lo, hi)] + [1e-4]) * 1.6
            bottom.set_title(f"{title}: paired per-user difference\n(95% bootstrap CI; {direction})", fontsize=9)
            labels = dmeans
        else:
            dstats = [_mean_err(figs[metric][a]["diff"]) for a in ARMS]
            dmeans = [m for m, _ in dstats]
            derrs = [e or 0 for _, e in dstats]
            xs = x
            bottom.bar(xs, dmeans, color=[COLORS[a] for a in ARMS], yerr=derrs if n_seeds >= 2 else None, capsize=4)
            bottom.set_xticks(xs, [LABELS[a] for a in ARMS], fontsize=8)
            span = max([abs(d) + e for d, e in zip(dmeans, derrs) if np.isfinite(d)] + [1e-4]) * 1.6
            bottom.set_title(f"{title}: difference to Cloud\n(per seed; {direction})", fontsize=9)
            labels = [None] + dmeans[1:]
        bottom.axhline(0, color="black", lw=0.8)
        bottom.set_ylim(-span, span)
        for i, d in enumerate(labels):
            if d is not None and np.isfinite(d):
                bottom.text(xs[i], d, f"{d:+.4f}", ha="center", va="bottom" if d >= 0 else "top", fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[a]) for a in ARMS]
    spread = (f"bars: mean over {n_seeds} seeds, error bars: ±1 std" if n_seeds >= 2
              else "one seed: no error bars over seeds (run with --seeds 3 for a spread)")
    fig.legend(handles, [LABELS[a] for a in ARMS], loc="lower center", ncol=len(ARMS), frameon=False)
    dataset = results.get("config", {}).get("dataset", "MovieLens-100k")
    fig.suptitle(f"CoDA on {dataset}: {results['users']} users, {results['config']['days']} days; {spread}",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
