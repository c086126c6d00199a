"""Turn CoDA samples (protobuf `Sample`s or JSON dicts with the same field names) into the padded
numpy arrays the MNN models take. Pure numpy: no MNN import, so the data side can use it cheaply."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from walle.protos.errors import InvalidArgument

HIST_LEN = 50
_INT32_MAX = 2**31 - 1
_LIST_FIELDS = ("item_cats", "hist_items", "hist_cats", "profile")


@dataclass(frozen=True)
class SampleArrays:
    """Column arrays for N samples. History is left-aligned: positions [0, n) hold the n most recent
    behaviours (oldest first), the rest are id 0 with mask 0."""

    hist_items: np.ndarray  # int32 [N, L]
    hist_cats: np.ndarray  # int32 [N, L]
    mask: np.ndarray  # float32 [N, L], 1 = real behaviour
    item: np.ndarray  # int32 [N] target item
    item_cat: np.ndarray  # int32 [N] first category of the target item (0 = none)
    profile: np.ndarray  # float32 [N, P]
    label: np.ndarray  # float32 [N]

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @property
    def hist_len(self) -> int:
        return int(self.hist_items.shape[1])

    def take(self, idx: np.ndarray | Sequence[int]) -> "SampleArrays":
        idx = np.asarray(idx, dtype=np.int64)
        return SampleArrays(*(getattr(self, f)[idx] for f in _FIELDS))

    def with_labels(self, labels: Sequence[float] | np.ndarray) -> "SampleArrays":
        """Same features, new labels (the sample classifier's local=1 / outside=0)."""
        lab = _labels(labels, len(self))
        return SampleArrays(self.hist_items, self.hist_cats, self.mask, self.item, self.item_cat,
                            self.profile, lab)

    @staticmethod
    def concat(parts: Sequence["SampleArrays"]) -> "SampleArrays":
        if not parts:
            raise InvalidArgument("concat needs at least one SampleArrays")
        if len({p.hist_len for p in parts}) != 1 or len({p.profile.shape[1] for p in parts}) != 1:
            raise InvalidArgument("concat: parts differ in history length or profile width")
        return SampleArrays(*(np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS))

    @classmethod
    def from_samples(cls, samples: Iterable[Any], hist_len: int = HIST_LEN,
                     profile_dim: int | None = None) -> "SampleArrays":
        """Build arrays from `Sample` messages or dicts. Histories longer than `hist_len` keep the most
        recent `hist_len` behaviours. `profile_dim=None` infers the width (every non-empty profile must
        agree), 0 ignores profiles, and a positive value requires that width (empty = zeros)."""
        if not isinstance(hist_len, int) or not 1 <= hist_len <= 1024:
            raise InvalidArgument(f"hist_len must be an int in [1, 1024], got {hist_len!r}")
        rows = [_row(s, i) for i, s in enumerate(samples)]
        n = len(rows)
        if profile_dim is None:
            widths = {len(r["profile"]) for r in rows} - {0}
            if len(widths) > 1:
                raise InvalidArgument(f"samples have profiles of different lengths {sorted(widths)}")
            profile_dim = widths.pop() if widths else 0
        hist_items = np.zeros((n, hist_len), np.int32)
        hist_cats = np.zeros((n, hist_len), np.int32)
        mask = np.zeros((n, hist_len), np.float32)
        item = np.zeros(n, np.int32)
        item_cat = np.zeros(n, np.int32)
        profile = np.zeros((n, profile_dim), np.float32)
        label = np.zeros(n, np.float32)
        for i, r in enumerate(rows):
            hi, hc = r["hist_items"][-hist_len:], r["hist_cats"][-hist_len:]
            k = len(hi)
            hist_items[i, :k] = hi
            hist_cats[i, :k] = hc
            mask[i, :k] = 1.0
            item[i] = r["item_id"]
            item_cat[i] = r["item_cats"][0] if r["item_cats"] else 0
            if profile_dim and r["profile"]:
                if len(r["profile"]) != profile_dim:
                    raise InvalidArgument(f"sample {i}: profile has {len(r['profile'])} values, "
                                          f"expected {profile_dim}")
                profile[i] = r["profile"]
            label[i] = r["label"]
        return cls(hist_items, hist_cats, mask, item, item_cat, profile, label)


_FIELDS = ("hist_items", "hist_cats", "mask", "item", "item_cat", "profile", "label")


def _labels(labels: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    try:
        lab = np.asarray(labels, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"labels must be a list of numbers: {e}") from None
    if lab.shape[0] != n:
        raise InvalidArgument(f"labels has {lab.shape[0]} values for {n} samples")
    if not np.all(np.isfinite(lab)) or lab.min(initial=0) < 0 or lab.max(initial=0) > 1:
        raise InvalidArgument("labels must be finite numbers in [0, 1]")
    return lab


def _get(s: Any, field: str, i: int) -> Any:
    if isinstance(s, dict):
        return s.get(field)
    if hasattr(s, "DESCRIPTOR"):  # protobuf Sample
        v = getattr(s, field)
        return list(v) if field in _LIST_FIELDS else v
    raise InvalidArgument(f"sample {i} must be a dict or a Sample message, got {type(s).__name__}")


def _int(v: Any, field: str, i: int) -> int:
    # bool is an int subclass; a JSON true/false is never a valid id.
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise InvalidArgument(f"sample {i}: {field} must hold integers, got {v!r}")
    if not 0 <= int(v) <= _INT32_MAX:
        raise InvalidArgument(f"sample {i}: {field} value {v} is outside [0, 2^31-1]")
    return int(v)


def _float(v: Any, field: str, i: int) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise InvalidArgument(f"sample {i}: {field} must be a number, got {v!r}")
    if not math.isfinite(float(v)):
        raise InvalidArgument(f"sample {i}: {field} must be finite, got {v!r}")
    return float(v)


def _row(s: Any, i: int) -> dict[str, Any]:
    """Validate one sample and return plain Python values."""
    out: dict[str, Any] = {}
    for field in _LIST_FIELDS:
        v = _get(s, field, i)
        if v is None:
            v = []
        if not isinstance(v, (list, tuple, np.ndarray)):
            raise InvalidArgument(f"sample {i}: {field} must be a list, got {type(v).__name__}")
        conv = _float if field == "profile" else _int
        out[field] = [conv(x, field, i) for x in v]
    if len(out["hist_items"]) != len(out["hist_cats"]):
        raise InvalidArgument(f"sample {i}: hist_items has {len(out['hist_items'])} entries but "
                              f"hist_cats has {len(out['hist_cats'])}")
    item = _get(s, "item_id", i)
    out["item_id"] = _int(0 if item is None else item, "item_id", i)
    lab = _get(s, "label", i)
    lab = _float(0.0 if lab is None else lab, "label", i)
    if not 0.0 <= lab <= 1.0:
        raise InvalidArgument(f"sample {i}: label must be in [0, 1], got {lab}")
    out["label"] = lab
    return out
