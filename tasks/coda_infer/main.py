"""CoDA recommendation (paper 4.4.3): rank a page's candidate items with the personal CTR model.

Triggered by `page_view:<page>` events from the app, whose payload is
    {"candidates": [sample dict, ...], "model": "ctr"}
Each candidate is a sample dict with `Sample` field names (item_id, item_cats, hist_items, hist_cats,
profile): a candidate item in the context of the user's current history. List fields may also be
JSON text, as they are stored in the tables. "model" is optional (default "ctr"; the demo's Local
arm passes "ctr_local"). The host serves M, or the backup M0 while M is being replaced.
Returns {"ranking": [item_id, ...] best first, "scores": [...] in the same order, "served_from",
"version"}.
"""
import json

from walle import model

DEFAULT_MODEL = "ctr"
MAX_CANDIDATES = 2000  # the model ops take at most 2,000 samples per call
LIST_FIELDS = ("item_cats", "hist_items", "hist_cats", "profile")


def short(value):
    """A value for an error message, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def candidate(c, i):
    if not isinstance(c, dict):
        raise ValueError(f"payload.candidates[{i}] must be an object with Sample fields, got {short(c)}")
    item = c.get("item_id")
    if isinstance(item, bool) or not isinstance(item, int):
        raise ValueError(f"payload.candidates[{i}].item_id must be an integer item id, got {short(item)}")
    s = dict(c)
    for f in LIST_FIELDS:
        v = s.get(f)
        if isinstance(v, str):
            try:
                s[f] = json.loads(v)
            except ValueError:
                raise ValueError(f"payload.candidates[{i}].{f} is text but not a JSON list: {v[:80]!r}") from None
    return s


def main(event):
    if not isinstance(event, dict):
        raise ValueError(f"event must be an object, got {short(event)}")
    payload = event.get("payload")
    if not isinstance(payload, dict):
        raise ValueError(f"event payload must be an object with a 'candidates' list, got {short(payload)}")
    cands = payload.get("candidates")
    if cands is None:
        raise ValueError("payload.candidates is missing: send the page's candidate items as sample dicts")
    if not isinstance(cands, list):
        raise ValueError(f"payload.candidates must be a list of sample dicts, got {short(cands)}")
    if not cands:
        raise ValueError("payload.candidates is empty: there is nothing to rank")
    if len(cands) > MAX_CANDIDATES:
        raise ValueError(f"payload.candidates has {len(cands)} items; at most {MAX_CANDIDATES} per page view")
    name = payload.get("model", DEFAULT_MODEL)
    if not isinstance(name, str) or not name:
        raise ValueError(f"payload.model must be a model name, got {short(name)}")
    samples = [candidate(c, i) for i, c in enumerate(cands)]
    res = model.predict(name=name, samples=samples)
    probs = res["probs"]
    order = sorted(range(len(samples)), key=lambda i: (-probs[i], i))  # ties keep the app's order
    return {"ranking": [samples[i]["item_id"] for i in order], "scores": [probs[i] for i in order],
            "served_from": res["served_from"], "version": res["version"], "model": name}
