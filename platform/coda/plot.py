"""results.png for the CoDA experiment: every metric of the results table, drawn so it cannot mislead.

Top row: each metric's value per arm on an axis that starts at a meaningful floor (AUC from 0.5,
chance; logloss from 0), so bar heights compare honestly. Bottom row: each arm's difference to Cloud,
paired per seed, with a zero line and the value written on the bar: small gaps are shown as small
numbers, not as tall bars on a cut axis. Titles say which way is better; error bars (standard
deviation over seeds) appear only with two or more seeds."""
from __future__ import annotations

import pathlib

import numpy as np

ARMS = ("cloud", "local", "coda")
LABELS = {"cloud": "Cloud", "local": "Local", "coda": "CoDA"}
COLORS = {"cloud": "#8c8c8c", "local": "#55aa99", "coda": "#3366cc"}
# metric -> (title, higher is better, axis floor)
METRICS = {
    "user_auc_mean": ("per-user AUC", True, 0.5),
    "pooled_auc": ("pooled AUC", True, 0.5),
    "user_logloss_mean": ("per-user logloss", False, 0.0),
    "pooled_logloss": ("pooled logloss", False, 0.0),
}


def figures(results: dict) -> dict:
    """metric -> arm -> {"values": per-seed values, "diff": per-seed (arm - cloud)}."""
    seeds = list(results["seeds"].values())
    out = {}
    for metric in METRICS:
        out[metric] = {}
        for arm in ARMS:
            pairs = [(s[arm][metric], s["cloud"][metric]) for s in seeds
                     if s[arm][metric] is not None and s["cloud"][metric] is not None]
            out[metric][arm] = {"values": [a for a, _ in pairs], "diff": [a - c for a, c in pairs]}
    return out


def _mean_err(values: list[float]) -> tuple[float, float | None]:
    """Mean, and the standard deviation only when there are at least two seeds."""
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) >= 2 else None)


def plot(results: dict, path: str | pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figs = figures(results)
    n_seeds = len(results["seeds"])
    fig, axes = plt.subplots(2, len(METRICS), figsize=(3.3 * len(METRICS), 6.4))
    x = np.arange(len(ARMS))
    for col, (metric, (title, higher, floor)) in enumerate(METRICS.items()):
        direction = "higher is better ↑" if higher else "lower is better ↓"
        top, bottom = axes[0][col], axes[1][col]
        stats = [_mean_err(figs[metric][a]["values"]) for a in ARMS]
        means = [m for m, _ in stats]
        errs = [e for _, e in stats]
        top.bar(x, [m - floor for m in means], bottom=floor, color=[COLORS[a] for a in ARMS],
                yerr=[e or 0 for e in errs] if n_seeds >= 2 else None, capsize=4)
        ceiling = 1.0 if higher else max(means) * 1.25
        top.set_ylim(floor, ceiling)
        top.set_title(f"{title}\n({direction})", fontsize=10)
        top.set_xticks(x, [LABELS[a] for a in ARMS])
        for i, m in enumerate(means):
            top.text(i, m, f"{m:.4f}", ha="center", va="bottom", fontsize=8)
        if higher:
            top.axhline(0.5, color="#cc4444", lw=0.8, ls=":")
        # difference to Cloud, paired per seed
        dstats = [_mean_err(figs[metric][a]["diff"]) for a in ARMS]
        dmeans = [m for m, _ in dstats]
        derrs = [e or 0 for _, e in dstats]
        better = [(d > 0) == higher and d != 0 for d in dmeans]
        bottom.bar(x, dmeans, color=[COLORS[a] for a in ARMS], yerr=derrs if n_seeds >= 2 else None, capsize=4,
                   edgecolor=["#1e8449" if b else "#c0392b" if d != 0 else "none" for b, d in zip(better, dmeans)],
                   linewidth=1.5)
        bottom.axhline(0, color="black", lw=0.8)
        span = max([abs(d) + e for d, e in zip(dmeans, derrs)] + [1e-4]) * 1.6
        bottom.set_ylim(-span, span)
        bottom.set_title(f"{title}: difference to Cloud\n({direction})", fontsize=10)
        bottom.set_xticks(x, [LABELS[a] for a in ARMS])
        for i, d in enumerate(dmeans):
            if i:
                bottom.text(i, d, f"{d:+.4f}", ha="center", va="bottom" if d >= 0 else "top", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[a]) for a in ARMS]
    spread = (f"bars: mean over {n_seeds} seeds, error bars: ±1 std" if n_seeds >= 2
              else "one seed: no error bars (run with --seeds 3 for a spread)")
    fig.legend(handles, [LABELS[a] for a in ARMS], loc="lower center", ncol=3, frameon=False)
    data = results["config"].get("dataset", "movielens-100k")  # results of older runs name none
    fig.suptitle(f"CoDA on {data}: {results['users']} users, {results['config']['days']} days; {spread}",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
