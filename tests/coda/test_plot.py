"""results.png: every metric of the results table for the four arms, honest axes, the paired
per-user differences with their bootstrap intervals, per-seed differences to Cloud for pooled
metrics, direction labels, and error bars over seeds only from two or more seeds."""
import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402

from walle.platform.coda import plot as plot_mod  # noqa: E402

COLS = ("user_auc_mean", "pooled_auc", "pooled_logloss", "hr@10", "ndcg@10")
PAIRS = ("coda-cloud", "coda-local", "coda-calibration", "local-cloud")


def _results(seeds: dict, paired: dict | None = None) -> dict:
    return {"users": 50, "config": {"days": 3},
            "seeds": {str(k): {a: dict(zip(COLS, v)) for a, v in arms.items()} for k, arms in seeds.items()},
            "paired": paired or {p: {m: {"mean": 0.01 * (i + 1), "lo": 0.01 * i - 0.005, "hi": 0.01 * (i + 2)}
                                     for m in ("auc", "hr@10", "ndcg@10")} for i, p in enumerate(PAIRS)}}


SEED0 = {"cloud": (0.7010, 0.7200, 0.610, 0.60, 0.30), "calibration": (0.7010, 0.7350, 0.590, 0.60, 0.30),
         "local": (0.6500, 0.6600, 0.650, 0.55, 0.28), "coda": (0.6995, 0.7230, 0.605, 0.62, 0.31)}
SEED1 = {"cloud": (0.7030, 0.7190, 0.612, 0.61, 0.31), "calibration": (0.7030, 0.7340, 0.592, 0.61, 0.31),
         "local": (0.6520, 0.6610, 0.651, 0.56, 0.29), "coda": (0.7000, 0.7225, 0.606, 0.63, 0.32)}


def _draw(results, monkeypatch, tmp_path):
    import matplotlib.pyplot as plt
    captured = {}
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: captured.setdefault("fig", fig))
    path = tmp_path / "results.png"
    plot_mod.plot(results, path)
    real_close(captured["fig"])
    assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return captured["fig"]


def test_every_metric_honest_axes_directions_and_paired_differences(monkeypatch, tmp_path):
    results = _results({0: SEED0, 1: SEED1})
    fig = _draw(results, monkeypatch, tmp_path)
    axes = fig.axes
    assert len(axes) == 2 * len(plot_mod.METRICS)  # values, and the differences under them
    for metric, (title, higher, floor, per_user) in plot_mod.METRICS.items():
        top = next(a for a in axes if a.get_title().startswith(title + "\n"))
        assert ("higher is better" if higher else "lower is better") in top.get_title()
        assert top.get_ylim()[0] == floor  # AUC from chance, the others from zero: no cut axis
        assert [t.get_text() for t in top.get_xticklabels()] == ["Cloud", "Calib.", "Local", "CoDA"]
        if per_user:
            diff = next(a for a in axes if a.get_title().startswith(f"{title}: paired per-user difference"))
            # one bar per pair, at the paired mean, with its bootstrap interval as the error bar
            assert [p.get_height() for p in diff.patches] == pytest.approx(
                [results["paired"][p][per_user]["mean"] for p in PAIRS])
            err = next(c for c in diff.containers if isinstance(c, ErrorbarContainer))
            segs = err.lines[2][0].get_segments()
            assert [y for s in segs for y in (s[0][1], s[1][1])] == pytest.approx(
                [results["paired"][p][per_user][b] for p in PAIRS for b in ("lo", "hi")])
        else:
            diff = next(a for a in axes if a.get_title().startswith(f"{title}: difference to Cloud"))
            coda_bar = diff.patches[3]  # the mean of the per-seed differences
            i = COLS.index(metric)
            assert coda_bar.get_height() == pytest.approx(
                sum(s["coda"][i] - s["cloud"][i] for s in (SEED0, SEED1)) / 2)
            assert any(isinstance(c, ErrorbarContainer) for c in diff.containers)  # std from two seeds
        lo, hi = diff.get_ylim()
        assert lo == -hi and hi > 0  # symmetric around zero
    legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend_texts == ["Cloud", "Calib.", "Local", "CoDA"]
    assert "error bars: ±1 std" in fig._suptitle.get_text()


def test_one_seed_draws_no_error_bars_over_seeds(monkeypatch, tmp_path):
    fig = _draw(_results({0: SEED0}), monkeypatch, tmp_path)
    tops = [a for a in fig.axes if "difference" not in a.get_title()]
    pooled = [a for a in fig.axes if "difference to Cloud" in a.get_title()]
    assert not any(isinstance(c, ErrorbarContainer) for a in tops + pooled for c in a.containers)
    assert "one seed: no error bars over seeds" in fig._suptitle.get_text()


def test_title_names_the_data_set(monkeypatch, tmp_path):
    results = _results({0: SEED0})
    assert "CoDA on MovieLens-100k: 50 users" in _draw(results, monkeypatch, tmp_path)._suptitle.get_text()
    results["config"]["dataset"] = "movielens-1m"
    assert "CoDA on movielens-1m: 50 users" in _draw(results, monkeypatch, tmp_path)._suptitle.get_text()
