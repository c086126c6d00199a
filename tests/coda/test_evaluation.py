"""The demo's evaluation (platform/coda/evaluation.py): HR/NDCG against a brute-force computation,
the calibration arm on a hand-checkable case, the evaluation pages, and the two-stage bootstrap."""
import itertools
import math

import numpy as np
import pytest

from walle.platform.coda import evaluation as ev


def brute_force_ranking_metrics(scores, relevant, k):
    """HR@k and NDCG@k straight from the definitions: rank by score (ties: page order), then count."""
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    top = ranked[:k]
    hr = 1.0 if any(relevant[i] for i in top) else 0.0
    dcg = sum(relevant[i] / math.log2(r + 2) for r, i in enumerate(top))
    n_rel = int(sum(relevant))
    idcg = sum(1 / math.log2(r + 2) for r in range(min(k, n_rel)))
    return hr, dcg / idcg


def test_hr_and_ndcg_by_hand():
    # relevant items at ranks 2 and 4 (1-based) of 5
    rel = ev.ranked_relevance([0.9, 0.8, 0.7, 0.6, 0.5], [0, 1, 0, 1, 0])
    assert rel.tolist() == [0, 1, 0, 1, 0]
    assert ev.hit_rate(rel, 1) == 0.0 and ev.hit_rate(rel, 2) == 1.0
    want = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert ev.ndcg(rel, 5) == pytest.approx(want)
    assert ev.ndcg(rel, 1) == 0.0
    # ties keep the page order: the first of two equal scores ranks first
    assert ev.ranked_relevance([0.5, 0.5], [0, 1]).tolist() == [0, 1]


@pytest.mark.parametrize("seed", range(20))
def test_hr_and_ndcg_match_a_brute_force_computation(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    scores = np.round(rng.random(n), 1).tolist()  # rounded: many ties
    relevant = (rng.random(n) < 0.3).astype(int).tolist()
    if not any(relevant):
        relevant[int(rng.integers(0, n))] = 1
    rel = ev.ranked_relevance(scores, relevant)
    for k in (1, 5, 10):
        hr, nd = brute_force_ranking_metrics(scores, relevant, k)
        assert ev.hit_rate(rel, k) == hr and ev.ndcg(rel, k) == pytest.approx(nd)


def test_calibration_offset_by_hand():
    # 10 training samples, 6 clicks, the cloud predicts 0.2 on average; ALPHA = 10 pseudo-samples at 0.2:
    # smoothed rate (6 + 2) / 20 = 0.4, offset = logit(0.4) - logit(0.2)
    labels, preds = [1] * 6 + [0] * 4, [0.1, 0.3] * 5
    off = ev.calibration_offset(labels, preds, alpha=10.0)
    assert off == pytest.approx(math.log(0.4 / 0.6) - math.log(0.2 / 0.8))
    assert ev.calibrate([0.2], off)[0] == pytest.approx(0.4)  # the mean prediction moves to the smoothed rate
    assert ev.calibration_offset([], []) == 0.0  # no data: the cloud model as is
    assert ev.calibration_offset([0, 1], [0.5, 0.5]) == pytest.approx(0.0)  # already calibrated
    # a constant offset never changes a user's ranking: per-user AUC and HR/NDCG equal Cloud's
    p = np.array([0.1, 0.7, 0.3, 0.9])
    assert np.argsort(ev.calibrate(p, 1.3)).tolist() == np.argsort(p).tolist()


def test_user_metrics_and_arm_results_on_a_small_case():
    page = ev.UserPage(labels=np.array([1.0, 0.0, 1.0]), page_relevant=np.array([0.0, 1.0, 0.0, 1.0]),
                       scores={"a": np.array([0.9, 0.1, 0.2])}, page_scores={"a": np.array([0.4, 0.3, 0.2, 0.1])})
    m = ev.user_metrics(page, "a")
    assert m["auc"] == pytest.approx(1.0)  # both clicks above the non-click
    assert m["hr@5"] == 1.0 and m["ndcg@5"] == pytest.approx(
        (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3)))
    no_click = ev.UserPage(np.array([0.0]), np.array([0.0, 0.0]), {"a": np.array([0.3])}, {"a": np.array([0.5, 0.1])})
    summary, per_user = ev.arm_results({2: no_click, 1: page}, "a")
    assert per_user["hr@10"] == [1.0, None]  # user-id order; no held-out click: not counted
    assert summary["users_with_auc"] == 1 and summary["users_with_click"] == 1 and summary["test_samples"] == 4
    assert summary["pooled_auc"] == pytest.approx(ev.auc([1, 0, 1, 0], [0.9, 0.1, 0.2, 0.3]))


def test_evaluation_pages_are_fixed_per_user_and_hold_what_they_say():
    catalog = np.arange(1, 501)
    heldout, interacted = [5, 9, 11], set(range(1, 40))
    page = ev.page_items(7, heldout, interacted, catalog)
    assert page == ev.page_items(7, heldout, interacted, catalog)  # the same page in every seed and arm
    assert page != ev.page_items(8, heldout, interacted, catalog)
    assert len(page) == len(heldout) + ev.NEGATIVES and len(set(page)) == len(page)
    assert set(heldout) <= set(page) and not (set(page) - set(heldout)) & interacted
    assert page[:3] != heldout  # shuffled: held-out items are not first
    assert sorted(ev.page_items(1, [2], {1, 2, 3}, np.arange(1, 6))) == [2, 4, 5]  # small catalog: what is left


def test_bootstrap_ci_is_exact_for_constant_differences_and_covers_the_mean():
    const = ev.bootstrap_ci([np.full(50, 0.02), np.full(30, 0.02)])
    assert const["mean"] == pytest.approx(0.02) and const["lo"] == pytest.approx(0.02) == const["hi"]
    rng = np.random.default_rng(1)
    one = ev.bootstrap_ci([rng.normal(0.1, 0.05, 400)])
    assert one["lo"] < one["mean"] < one["hi"] and one["seeds"] == 1 and one["users"] == 400
    # the normal-theory interval of a mean: +-1.96 sd / sqrt(n) ~ 0.0049
    assert (one["hi"] - one["lo"]) / 2 == pytest.approx(1.96 * 0.05 / 20, rel=0.15)
    assert ev.bootstrap_ci([]) == {"mean": None, "lo": None, "hi": None, "users": 0, "seeds": 0}
    assert ev.bootstrap_ci([np.zeros(10)], seed=3) == ev.bootstrap_ci([np.zeros(10)], seed=3)


def test_bootstrap_over_seeds_widens_the_interval_when_seeds_disagree():
    rng = np.random.default_rng(2)
    agree = [rng.normal(0.05, 0.02, 300) for _ in range(3)]
    disagree = [rng.normal(m, 0.02, 300) for m in (0.0, 0.05, 0.10)]
    w_agree = ev.bootstrap_ci(agree)
    w_dis = ev.bootstrap_ci(disagree)
    assert (w_dis["hi"] - w_dis["lo"]) > 5 * (w_agree["hi"] - w_agree["lo"])
    assert w_dis["lo"] < 0.05 < w_dis["hi"]


def test_paired_differences_use_users_defined_in_both_arms():
    seeds = [{arm: {m: [0.6, None, 0.8] if arm == "coda" else [0.5, 0.7, None] for m in ev.USER_METRICS}
              for arm in ev.ARMS}]
    out = ev.paired(seeds)
    assert set(out) == {"coda-cloud", "coda-local", "coda-calibration", "local-cloud"}
    assert out["coda-cloud"]["auc"]["users"] == 1 and out["coda-cloud"]["auc"]["mean"] == pytest.approx(0.1)
    assert out["local-cloud"]["hr@10"]["mean"] == pytest.approx(0.0) and out["local-cloud"]["hr@10"]["users"] == 2
    assert list(itertools.chain(ev.paired_diffs([1.0, None], [0.5, 0.2]))) == [0.5]
