"""results.png: every metric of the results table, honest axes, a paired difference-to-Cloud
panel, direction labels, and error bars only from two or more seeds."""
import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402

from walle.platform.coda import plot as plot_mod  # noqa: E402


def _results(seeds: dict) -> dict:
    def arm(auc, pooled_auc, ll, pooled_ll):
        return {"user_auc_mean": auc, "pooled_auc": pooled_auc, "user_logloss_mean": ll, "pooled_logloss": pooled_ll}
    return {"users": 50, "config": {"days": 3},
            "seeds": {str(k): {a: arm(*v) for a, v in arms.items()} for k, arms in seeds.items()}}


SEED0 = {"cloud": (0.7010, 0.7200, 0.600, 0.610), "local": (0.6500, 0.6600, 0.640, 0.650),
         "coda": (0.6995, 0.7230, 0.602, 0.605)}
SEED1 = {"cloud": (0.7030, 0.7190, 0.598, 0.612), "local": (0.6520, 0.6610, 0.642, 0.651),
         "coda": (0.7000, 0.7225, 0.601, 0.606)}


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
    fig = _draw(_results({0: SEED0, 1: SEED1}), monkeypatch, tmp_path)
    axes = fig.axes
    assert len(axes) == 8  # 4 metrics x (values, difference to Cloud)
    titles = [a.get_title() for a in axes]
    for metric, (title, higher, floor) in plot_mod.METRICS.items():
        top = next(a for a in axes if a.get_title().startswith(title + "\n"))
        diff = next(a for a in axes if a.get_title().startswith(f"{title}: difference to Cloud"))
        assert ("higher is better" if higher else "lower is better") in top.get_title()
        assert top.get_ylim()[0] == floor  # AUC from chance, logloss from zero: no cut axis
        lo, hi = diff.get_ylim()
        assert lo == -hi and hi > 0  # symmetric around zero
        # the bottom panel's CoDA bar is the mean of the per-seed differences
        coda_bar = diff.patches[2]
        want = sum(s["coda"][list(plot_mod.METRICS).index(metric)] - s["cloud"][list(plot_mod.METRICS).index(metric)]
                   for s in (SEED0, SEED1)) / 2
        assert coda_bar.get_height() == pytest.approx(want)
        # error bars drawn from two seeds
        assert any(isinstance(c, ErrorbarContainer) for c in top.containers + diff.containers)
    assert "pooled AUC\n(higher is better ↑)" in titles
    legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend_texts == ["Cloud", "Local", "CoDA"]
    assert "error bars: ±1 std" in fig._suptitle.get_text()


def test_one_seed_draws_no_error_bars(monkeypatch, tmp_path):
    fig = _draw(_results({0: SEED0}), monkeypatch, tmp_path)
    assert not any(isinstance(c, ErrorbarContainer) for a in fig.axes for c in a.containers)
    assert "one seed: no error bars" in fig._suptitle.get_text()


def test_title_names_the_data_set(monkeypatch, tmp_path):
    results = _results({0: SEED0})
    assert "CoDA on movielens-100k: 50 users" in _draw(results, monkeypatch, tmp_path)._suptitle.get_text()
    results["config"]["dataset"] = "movielens-1m"
    assert "CoDA on movielens-1m: 50 users" in _draw(results, monkeypatch, tmp_path)._suptitle.get_text()
