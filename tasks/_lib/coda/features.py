"""CoDA samples -> the padded numpy columns the models take. Pure numpy.

A sample is a dict with `Sample` field names: item_id, item_cats, hist_items, hist_cats, profile,
label. Histories are left-aligned: positions [0, n) hold the n most recent behaviours (oldest
first), the rest are id 0 with mask 0; longer histories keep the most recent `hist_len`."""
import math

import numpy as np

FIELDS = ("hist_items", "hist_cats", "mask", "item", "item_cat", "profile", "label")
INT32_MAX = 2147483647


def short(value):
    """A value for an error message, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def ids(values, field, i):
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"sample {i}: {field} must be a list, got {short(values)}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= INT32_MAX:
            raise ValueError(f"sample {i}: {field} must hold integer ids in [0, 2^31-1], got {short(v)}")
    return values


def number(v, field, i, lo=None, hi=None):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"sample {i}: {field} must be a finite number, got {short(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"sample {i}: {field} must be in [{lo}, {hi}], got {v}")
    return float(v)


class Batch:
    """Column arrays for N samples (see FIELDS)."""

    def __init__(self, cols):
        self.cols = cols

    def get(self, field):
        return self.cols[field]

    @property
    def n(self):
        return int(self.cols["label"].shape[0])

    @property
    def hist_len(self):
        return int(self.cols["hist_items"].shape[1])

    @property
    def label(self):
        return self.cols["label"]

    def take(self, idx):
        idx = np.asarray(idx, dtype=np.int64)
        return Batch({f: self.cols[f][idx] for f in FIELDS})

    def with_labels(self, labels):
        """Same features, new labels (the sample classifier's local = 1 / outside = 0)."""
        lab = np.asarray(labels, dtype=np.float32).reshape(-1)
        if lab.shape[0] != self.n:
            raise ValueError(f"{lab.shape[0]} labels for {self.n} samples")
        cols = dict(self.cols)
        cols["label"] = lab
        return Batch(cols)

    @staticmethod
    def concat(parts):
        return Batch({f: np.concatenate([p.cols[f] for p in parts]) for f in FIELDS})


def batch(samples, hist_len, profile_dim=0):
    """Validate the sample dicts and build a Batch; every error names the sample and the field."""
    n = len(samples)
    hist_items = np.zeros((n, hist_len), np.int32)
    hist_cats = np.zeros((n, hist_len), np.int32)
    mask = np.zeros((n, hist_len), np.float32)
    item = np.zeros(n, np.int32)
    item_cat = np.zeros(n, np.int32)
    profile = np.zeros((n, profile_dim), np.float32)
    label = np.zeros(n, np.float32)
    for i, s in enumerate(samples):
        if not isinstance(s, dict):
            raise ValueError(f"sample {i} must be a dict, got {short(s)}")
        hi = ids(s.get("hist_items") or [], "hist_items", i)[-hist_len:]
        hc = ids(s.get("hist_cats") or [], "hist_cats", i)[-hist_len:]
        if len(hi) != len(hc):
            raise ValueError(f"sample {i}: hist_items has {len(hi)} entries but hist_cats has {len(hc)}")
        k = len(hi)
        if k:
            hist_items[i, :k] = hi
            hist_cats[i, :k] = hc
            mask[i, :k] = 1.0
        item[i] = ids([s.get("item_id") or 0], "item_id", i)[0]
        cats = ids(s.get("item_cats") or [], "item_cats", i)
        item_cat[i] = cats[0] if cats else 0
        if profile_dim:
            prof = s.get("profile") or []
            if prof:
                if len(prof) != profile_dim:
                    raise ValueError(f"sample {i}: profile has {len(prof)} values, expected {profile_dim}")
                profile[i] = [number(v, "profile", i) for v in prof]
        label[i] = number(s.get("label") or 0.0, "label", i, 0.0, 1.0)
    return Batch({"hist_items": hist_items, "hist_cats": hist_cats, "mask": mask, "item": item,
                  "item_cat": item_cat, "profile": profile, "label": label})
