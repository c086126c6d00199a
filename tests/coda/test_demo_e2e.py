"""A short run of the main job: the CoDA work cycle for a few MovieLens users over real gRPC with
TLS, tasks in the sandbox, and the three-arm evaluation on held-out data."""
import json

import pytest
from click.testing import CliRunner

from walle.platform.cli import main
from walle.platform.coda.experiment import Config, Experiment


@pytest.mark.slow
def test_short_coda_demo_end_to_end(tmp_path):
    exp = Experiment(Config(users=6, days=2, out_dir=str(tmp_path / "out"), workers=2))
    res = exp.run()
    seed = res["seeds"]["0"]
    for arm in ("cloud", "local", "coda"):
        m = seed[arm]
        assert m["test_samples"] > 0 and 0.0 < m["pooled_auc"] < 1.0 and m["pooled_logloss"] > 0
    cost = seed["cost"]
    assert cost["task_runs"] >= 6 * 2 and cost["task_runs_failed"] == 0, cost["first_failure"]
    assert cost["batches_pulled"] > 0 and 0 < cost["kb_per_trigger"] < 64
    diag = seed["diagnostics"]
    assert diag["infer_runs"] == 6 and len(diag["example_home_page_top5"]) == 5  # one home page per device-day
    assert 0 < diag["filter_kept"] <= diag["filter_scored"]
    stats = seed["release_stats"]
    assert stats["coda_filter"]["delivered"] == 6 and stats["coda_filter"]["ran"] == 6
    assert stats["coda_train"]["runs"] >= 6 and stats["coda_train"]["failed"] == 0
    out = json.loads((tmp_path / "out" / "results.json").read_text())
    assert out["summary"]["coda"]["pooled_auc"]["mean"] == pytest.approx(seed["coda"]["pooled_auc"])
    assert (tmp_path / "out" / "results.png").stat().st_size > 5_000
    # held-out interactions were never uploaded: the cloud saw only the training days
    assert out["split"]["test_rows"] > 0 and out["split"]["days"] == 2


def test_demo_part_one_over_tls():
    res = CliRunner().invoke(main, ["demo", "--skip-coda"])
    assert res.exit_code == 0, res.output
    assert "platform serving TLS" in res.output
    lines = [line for line in res.output.splitlines() if "phone-" in line]
    assert any("phone-alice" in line and "hello@" in line for line in lines)
    assert any("phone-bob" in line and "(nothing)" in line for line in lines)
