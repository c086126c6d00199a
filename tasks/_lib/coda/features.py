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


def listed(s, field, i):
    """A sample's list field ([] when missing or empty)."""
    v = s[field] if field in s else None
    if not v:
        return []
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"sample {i}: {field} must be a list, got {short(v)}")
    return v


def id_array(values, field, owners, samples):
    """`values` (ids of all samples, in order) as int32, checked at numpy speed; when the check fails,
    the per-value check finds the sample (`owners[j]` is the sample of values[j]) and says why."""
    arr = None
    try:
        arr = np.asarray(values) if values else np.zeros(0, np.int64)
    except (ValueError, TypeError, OverflowError):
        pass
    if arr is not None and arr.ndim == 1 and arr.dtype.kind in "iu" and (
            not arr.size or (int(arr.min()) >= 0 and int(arr.max()) <= INT32_MAX)):
        return arr.astype(np.int32)
    for j, v in enumerate(values):
        ids([v], field, owners[j])
    raise ValueError(f"{field} must hold integer ids in [0, 2^31-1]")


def batch(samples, hist_len, profile_dim=0):
    """Validate the sample dicts and build a Batch; every error names the sample and the field."""
    n = len(samples)
    flat_items, flat_cats, lens, owners = [], [], [], []
    item, item_cats, cat_owners, item_cat, label = [], [], [], [], []
    profile = np.zeros((n, profile_dim), np.float32)
    for i, s in enumerate(samples):
        if not isinstance(s, dict):
            raise ValueError(f"sample {i} must be a dict, got {short(s)}")
        hi = listed(s, "hist_items", i)[-hist_len:]
        hc = listed(s, "hist_cats", i)[-hist_len:]
        if len(hi) != len(hc):
            raise ValueError(f"sample {i}: hist_items has {len(hi)} entries but hist_cats has {len(hc)}")
        flat_items += hi
        flat_cats += hc
        lens += [len(hi)]
        owners += [i] * len(hi)
        item += [(s["item_id"] if "item_id" in s else 0) or 0]
        cats = listed(s, "item_cats", i)
        item_cats += cats
        cat_owners += [i] * len(cats)
        item_cat += [cats[0] if cats else 0]
        if profile_dim:
            prof = listed(s, "profile", i)
            if prof:
                if len(prof) != profile_dim:
                    raise ValueError(f"sample {i}: profile has {len(prof)} values, expected {profile_dim}")
                profile[i] = [number(v, "profile", i) for v in prof]
        label += [(s["label"] if "label" in s else 0.0) or 0.0]
    id_array(item_cats, "item_cats", cat_owners, samples)
    lens = np.asarray(lens, dtype=np.int64)
    rows = np.repeat(np.arange(n), lens)
    cols = np.arange(rows.size) - np.repeat(np.cumsum(lens) - lens, lens)  # 0..k-1 within each sample
    hist_items = np.zeros((n, hist_len), np.int32)
    hist_cats = np.zeros((n, hist_len), np.int32)
    mask = np.zeros((n, hist_len), np.float32)
    hist_items[rows, cols] = id_array(flat_items, "hist_items", owners, samples)
    hist_cats[rows, cols] = id_array(flat_cats, "hist_cats", owners, samples)
    mask[rows, cols] = 1.0
    return Batch({"hist_items": hist_items, "hist_cats": hist_cats, "mask": mask,
                  "item": id_array(item, "item_id", list(range(n)), samples),
                  "item_cat": np.asarray(item_cat, dtype=np.int32).reshape(n), "profile": profile,
                  "label": labels(label)})


def labels(values):
    """Click labels in [0, 1] as float32, checked at numpy speed (the per-value check names a bad one)."""
    arr = None
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError):
        pass
    if arr is None or not np.all(np.isfinite(arr)) or (arr.size and (arr.min() < 0.0 or arr.max() > 1.0)) \
            or any(isinstance(v, bool) for v in values):
        for i, v in enumerate(values):
            number(v, "label", i, 0.0, 1.0)
    return arr.astype(np.float32).reshape(len(values))
