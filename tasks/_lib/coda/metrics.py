"""Metrics for Algorithm 3's gate and the evaluation: ROC AUC and log-loss."""
import numpy as np

HIGHER_IS_BETTER = {"auc": True, "logloss": False}


def auc(labels, scores):
    """ROC AUC by the rank-sum statistic, tied scores sharing their mean rank; None with one class."""
    y = np.asarray(labels) >= 0.5
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    uniq, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based
    ranks = mean_rank[inv]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels, probs, eps=1e-7):
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    t = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(t * np.log(p) + (1 - t) * np.log(1 - p)))


def score(metric, labels, probs):
    if metric == "auc":
        return auc(labels, probs)
    if metric == "logloss":
        return logloss(labels, probs)
    raise ValueError(f"metric must be one of {sorted(HIGHER_IS_BETTER)}, got {metric!r}")


def better(metric, new, old):
    """Strictly better in the metric's direction."""
    if new is None:
        return False
    if old is None:
        return True
    return new > old if HIGHER_IS_BETTER[metric] else new < old
