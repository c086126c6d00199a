"""CoDA recommendation (paper 4.4.3): rank a page's candidate items with the personal CTR model.

Triggered by `page_view:<page>` events from the app, whose payload is
    {"candidates": [sample dict, ...], "model": "ctr"}
Each candidate is a sample dict with `Sample` field names (item_id, item_cats, hist_items, hist_cats,
profile); list fields may also be JSON text, as stored in the tables. "model" is optional (default
"ctr"; the demo's Local arm passes "ctr_local"). The host serves M, or the backup M0 while M is
being replaced (4.4.1). A device that has no such model yet (coda_train has not run) creates it from
the cloud's global model (resource coda/global_model) and ranks with that. Returns {"ranking": [item_id, ...] best first, "scores", "served_from",
"version", "model"}.
With "models": [name, ...] instead of "model", each model scores the candidates and the answer is
{"models": {name: {"scores" in the candidates' order, "served_from", "version"}}} (the caller ranks):
the demo's evaluation page scores its CoDA and Local arms in one run."""
import json

from coda import din, features, stored, training

DEFAULT_MODEL = "ctr"
GLOBAL_RESOURCE = "coda/global_model"  # a device without the model yet ranks with the cloud's
MAX_CANDIDATES = 2000
MAX_MODELS = 4
LIST_FIELDS = ("item_cats", "hist_items", "hist_cats", "profile")


def candidate(c, i):
    if not isinstance(c, dict):
        raise ValueError(f"payload.candidates[{i}] must be an object with Sample fields, got {features.short(c)}")
    item = c.get("item_id")
    if isinstance(item, bool) or not isinstance(item, int):
        raise ValueError(f"payload.candidates[{i}].item_id must be an integer item id, got {features.short(item)}")
    s = dict(c)
    for f in LIST_FIELDS:
        if isinstance(s.get(f), str):
            try:
                s[f] = json.loads(s[f])
            except ValueError:
                raise ValueError(f"payload.candidates[{i}].{f} is text but not a JSON list: {s[f][:80]!r}") from None
    return s


def main(event):
    if not isinstance(event, dict):
        raise ValueError(f"event must be an object, got {features.short(event)}")
    payload = event.get("payload")
    if not isinstance(payload, dict):
        raise ValueError(f"event payload must be an object with a 'candidates' list, got {features.short(payload)}")
    cands = payload.get("candidates")
    if not isinstance(cands, list) or not cands:
        raise ValueError(f"payload.candidates must be a non-empty list of sample dicts, got {features.short(cands)}")
    if len(cands) > MAX_CANDIDATES:
        raise ValueError(f"payload.candidates has {len(cands)} items; at most {MAX_CANDIDATES} per page view")
    samples = [candidate(c, i) for i, c in enumerate(cands)]
    if "models" in payload:  # several models score one page in one run (an experiment's arms)
        names = payload["models"]
        if not isinstance(names, list) or not names or len(names) > MAX_MODELS or \
                not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"payload.models must be a list of 1..{MAX_MODELS} model names, got {features.short(names)}")
        return {"models": {n: score(n, samples) for n in names}}
    name = payload.get("model", DEFAULT_MODEL)
    if not isinstance(name, str) or not name:
        raise ValueError(f"payload.model must be a model name, got {features.short(name)}")
    got = score(name, samples)
    probs = got["scores"]
    order = sorted(range(len(samples)), key=lambda i: (-probs[i], i))  # ties keep the app's order
    return {"ranking": [samples[i]["item_id"] for i in order], "scores": [probs[i] for i in order],
            "served_from": got["served_from"], "version": got["version"], "model": name}


def score(name, samples):
    """Model `name`'s click probabilities of `samples`, in their order."""
    net, served_from, version = stored.load_for_inference(name, din.DIN, GLOBAL_RESOURCE)
    probs = training.predict(net, features.batch(samples, net.config["hist_len"], net.config["profile_dim"])).tolist()
    return {"scores": probs, "served_from": served_from, "version": version}
