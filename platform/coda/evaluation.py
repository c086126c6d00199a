"""Evaluation of the CoDA demo: the arms, the metrics and the paired confidence intervals.

Held-out data: each user's last 10% of interactions (movielens.assign_days), never emitted or
uploaded. Two things are measured on it, per user:

  - **Click prediction** (the paper's offline metric): the held-out interactions as samples (each with
    the history before it), labelled by the click (rating >= 4). Per-user AUC (users with both
    classes), pooled AUC over all users' samples, logloss.
  - **The home page** (the product's metric): one page per user, shown at the start of the held-out
    period, in the context of the user's training history: the user's held-out items plus
    `NEGATIVES` items the user never interacted with (training or held-out), drawn uniformly from the
    catalog with a generator seeded by the user id only (the same page in every seed and arm), in a
    shuffled order (ties keep it, as coda_infer does). Relevant = a held-out click. HR@k = 1 if a
    relevant item is in the top k; NDCG@k = DCG@k / ideal DCG@k with binary gains and 1/log2(rank+1)
    discounts. Users with at least one held-out click count.

Arms:
  - **Cloud**: the last day's global model (retrained by the pipeline on days 1..D of everyone's samples).
  - **Calibration**: Cloud plus one per-user logit offset, no training: with n_u training samples, c_u
    clicks and m_u = the Cloud model's mean prediction on them,
        offset_u = logit((c_u + ALPHA * m_u) / (n_u + ALPHA)) - logit(m_u),
    i.e. the user's click rate shrunk toward what Cloud already predicts (0 offset without data).
    A constant per user: it cannot change a user's ranking (per-user AUC, HR, NDCG equal Cloud's); it
    shows how much of a pooled gain is per-user calibration.
  - **Local** and **CoDA**: the devices' `ctr_local` and `ctr` (each day restarted from that day's
    Cloud model, then Algorithm 3 on local / augmented samples), asked through the app interface.

Paired differences (CoDA - Cloud, CoDA - Local, CoDA - Calibration, Local - Cloud) per user and
seed; 95% interval by a two-stage bootstrap: resample the seeds with replacement, then the users
within each drawn seed with replacement, statistic = the mean over drawn seeds of the mean over drawn
users; percentile interval over BOOTSTRAP resamples."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .tasklib import coda_module

ARMS = ("cloud", "calibration", "local", "coda")
PAIRS = (("coda", "cloud"), ("coda", "local"), ("coda", "calibration"), ("local", "cloud"))
KS = (5, 10)
NEGATIVES = 50          # never-interacted items on each user's evaluation home page
ALPHA = 10.0            # pseudo-samples of the calibration arm's shrinkage
BOOTSTRAP = 2000
PAGE_SEED = 20_220_814  # the pages' own seed: the same page for every run seed and arm
# per-user metrics, and whether higher is better
USER_METRICS = {"auc": True, "logloss": False, "hr@5": True, "hr@10": True, "ndcg@5": True, "ndcg@10": True}

_metrics = coda_module("metrics")
auc, logloss = _metrics.auc, _metrics.logloss


# -- metric functions ---------------------------------------------------------------------------------

def ranked_relevance(scores, relevant) -> np.ndarray:
    """Relevance in rank order: best score first, ties in page order (as coda_infer ranks)."""
    s = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(len(s)), -s))
    return np.asarray(relevant, dtype=np.float64)[order]


def hit_rate(rel_ranked, k: int) -> float:
    return float(np.asarray(rel_ranked)[:k].sum() > 0)


def ndcg(rel_ranked, k: int) -> float:
    rel = np.asarray(rel_ranked, dtype=np.float64)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = float((rel[:k] * discounts[:len(rel[:k])]).sum())
    ideal = np.sort(rel)[::-1][:k]
    idcg = float((ideal * discounts[:len(ideal)]).sum())
    return dcg / idcg if idcg > 0 else float("nan")


def logit(p):
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def calibration_offset(train_labels, train_preds, alpha: float = ALPHA) -> float:
    """The calibration arm's per-user logit offset (module docstring); 0 without training samples."""
    y = np.asarray(train_labels, dtype=np.float64)
    if len(y) == 0:
        return 0.0
    m = float(np.mean(train_preds))
    return float(logit((y.sum() + alpha * m) / (len(y) + alpha)) - logit(m))


def calibrate(preds, offset: float) -> np.ndarray:
    return sigmoid(logit(preds) + offset)


# -- the evaluation pages -----------------------------------------------------------------------------

def page_items(user_id: int, heldout: list[int], interacted: set[int], catalog: np.ndarray,
               negatives: int = NEGATIVES) -> list[int]:
    """The user's evaluation home page (module docstring): held-out items + `negatives` items never
    interacted with, shuffled; fixed by the user id."""
    rng = np.random.default_rng([PAGE_SEED, int(user_id)])
    pool = np.array(sorted(set(int(i) for i in catalog) - interacted), dtype=np.int64)
    neg = rng.choice(pool, size=min(negatives, len(pool)), replace=False).tolist() if len(pool) else []
    items = [int(i) for i in heldout] + [int(i) for i in neg]
    return [items[i] for i in rng.permutation(len(items))]


@dataclass
class UserPage:
    """One user's held-out evaluation: the click-prediction samples and the home page, with each arm's scores."""
    labels: np.ndarray                 # held-out samples' clicks
    page_relevant: np.ndarray          # page items: 1 = a held-out click
    scores: dict = field(default_factory=dict)       # arm -> scores of the held-out samples
    page_scores: dict = field(default_factory=dict)  # arm -> scores of the page items


def user_metrics(page: UserPage, arm: str) -> dict:
    y, p = page.labels, page.scores[arm]
    out = {"auc": auc(y, p), "logloss": logloss(y, p) if len(y) else None}
    has_click = page.page_relevant.sum() > 0
    rel = ranked_relevance(page.page_scores[arm], page.page_relevant)
    for k in KS:
        out[f"hr@{k}"] = hit_rate(rel, k) if has_click else None
        out[f"ndcg@{k}"] = ndcg(rel, k) if has_click else None
    return out


def arm_results(pages: dict[int, UserPage], arm: str) -> tuple[dict, dict]:
    """(summary, per-user metric lists in user-id order) of one arm over one seed's pages."""
    users = sorted(pages)
    per = [user_metrics(pages[u], arm) for u in users]
    per_user = {m: [r[m] for r in per] for m in USER_METRICS}
    y = np.concatenate([pages[u].labels for u in users]) if users else np.zeros(0)
    p = np.concatenate([pages[u].scores[arm] for u in users]) if users else np.zeros(0)

    def mean(metric):
        vals = [v for v in per_user[metric] if v is not None]
        return (float(np.mean(vals)) if vals else None), len(vals)
    summary = {}
    summary["user_auc_mean"], summary["users_with_auc"] = mean("auc")
    summary["user_logloss_mean"], _ = mean("logloss")
    summary["pooled_auc"], summary["pooled_logloss"] = auc(y, p), (logloss(y, p) if len(y) else None)
    summary["test_samples"] = int(len(y))
    for k in KS:
        summary[f"hr@{k}"], summary["users_with_click"] = mean(f"hr@{k}")
        summary[f"ndcg@{k}"], _ = mean(f"ndcg@{k}")
    return summary, per_user


# -- paired differences and the bootstrap ----------------------------------------------------------------

def paired_diffs(per_user_a: list, per_user_b: list) -> np.ndarray:
    """a - b for the users where both are defined."""
    return np.array([a - b for a, b in zip(per_user_a, per_user_b) if a is not None and b is not None],
                    dtype=np.float64)


def bootstrap_ci(diffs_by_seed: list[np.ndarray], *, resamples: int = BOOTSTRAP, seed: int = 0,
                 level: float = 0.95) -> dict:
    """Mean paired difference and its two-stage bootstrap interval (seeds, then users within seed)."""
    diffs = [np.asarray(d, dtype=np.float64) for d in diffs_by_seed if len(d)]
    if not diffs:
        return {"mean": None, "lo": None, "hi": None, "users": 0, "seeds": 0}
    rng = np.random.default_rng(seed)
    n_seeds = len(diffs)
    picks = rng.integers(0, n_seeds, size=(resamples, n_seeds))
    stat = np.zeros(resamples)
    for j in range(n_seeds):  # the j-th drawn seed of every resample, with its own user resample
        col = np.zeros(resamples)
        for s, d in enumerate(diffs):
            rows = np.nonzero(picks[:, j] == s)[0]
            if len(rows):
                idx = rng.integers(0, len(d), size=(len(rows), len(d)))
                col[rows] = d[idx].mean(axis=1)
        stat += col
    stat /= n_seeds
    tail = (1 - level) / 2 * 100
    return {"mean": float(np.mean([d.mean() for d in diffs])), "lo": float(np.percentile(stat, tail)),
            "hi": float(np.percentile(stat, 100 - tail)), "users": int(np.mean([len(d) for d in diffs])),
            "seeds": n_seeds}


def paired(per_user_by_seed: list[dict]) -> dict:
    """'a-b' -> metric -> bootstrap_ci of the per-user differences, over the seeds' per-user metrics
    (each: arm -> metric -> list in the same user order)."""
    out = {}
    for a, b in PAIRS:
        out[f"{a}-{b}"] = {m: bootstrap_ci([paired_diffs(s[a][m], s[b][m]) for s in per_user_by_seed])
                           for m in USER_METRICS}
    return out


def summarize(seeds: dict) -> dict:
    """arm -> metric -> {mean, std} over seeds (std with ddof 0, as before)."""
    out = {}
    for arm in ARMS:
        out[arm] = {}
        metrics = [k for k, v in next(iter(seeds.values()))[arm].items() if isinstance(v, float)]
        for metric in metrics:
            vals = [s[arm][metric] for s in seeds.values() if s[arm].get(metric) is not None]
            out[arm][metric] = {"mean": float(np.mean(vals)) if vals else None,
                                "std": float(np.std(vals)) if len(vals) > 1 else 0.0}
    return out
