"""Cloud-side global DIN training from the task library's DIN: deterministic model blobs that a
device store holds as they are and the library rebuilds the same net from."""
from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from walle.device_host.models.ops import make_model_ops
from walle.device_host.models.store import ModelStore
from walle.platform.coda.global_model import load_global, sample_dict, train_global
from walle.platform.coda.tasklib import coda_module
from walle.platform.errors import InvalidArgument
from walle.protos import coda_pb2

CATALOG = {"n_items": 200, "n_cats": 8}
CONFIG = {"hist_len": 20}


def make_samples(n: int, seed: int) -> list[coda_pb2.Sample]:
    """Item i has category i % 7 + 1; each user likes 2 categories, which fill the history; a
    liked target is clicked with p=0.85, another with p=0.15."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        liked = rng.choice(np.arange(1, 8), 2, replace=False)
        hist = [int(i) for i in rng.integers(1, 200, 60) if i % 7 + 1 in liked][:20]
        it = int(rng.integers(1, 200))
        c = it % 7 + 1
        out.append(coda_pb2.Sample(
            sample_id=f"s{k}", user=f"u{k % 50}", item_id=it, item_cats=[c], hist_items=hist,
            hist_cats=[h % 7 + 1 for h in hist], label=float(rng.random() < (0.85 if c in liked else 0.15))))
    return out


def test_global_model_learns_and_a_device_store_starts_from_it(tmp_path):
    train, val = make_samples(1500, 0), make_samples(500, 1)
    data, metrics = train_global(train, epochs=4, seed=5, catalog=CATALOG, config=CONFIG, lr=0.02, val_samples=val)
    print(f"global model: val AUC {metrics['val_auc']:.3f}, blob {len(data)} B")
    assert metrics["n_train"] == 1500 and metrics["steps"] == 4 * 47
    assert metrics["val_auc"] > 0.75
    net = load_global(data)
    assert net.config["n_items"] == 200 and net.config["hist_len"] == 20 and net.config["mlp"] == [32, 16]
    training, features = coda_module("training"), coda_module("features")
    va = features.batch([sample_dict(s) for s in val], 20)
    assert training.evaluate(net, va)["auc"] == pytest.approx(metrics["val_auc"])
    # A device initialises its CTR model from the published blob (paper 5.2: M starts as the global model).
    ops = make_model_ops(ModelStore(tmp_path), lambda name: data)
    info = ops["model.create"](name="ctr", resource="coda/global_model")
    assert info["meta"]["metrics"]["val_auc"] == metrics["val_auc"] and info["meta"]["arch"] == "din"
    got = ops["model.load"](name="ctr")
    dev = coda_module("din").DIN(got["meta"]["config"])
    dev.set_params(got["params"])
    assert np.array_equal(training.predict(dev, va), training.predict(net, va))


_CHILD = """
import hashlib, importlib.util, sys
spec = importlib.util.spec_from_file_location("tg", {path!r}); tg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tg)
params, metrics = tg.train_global(tg.make_samples(300, 0), epochs=1, seed=3, catalog=tg.CATALOG)
print(hashlib.sha256(params).hexdigest())
"""


def test_global_model_is_deterministic_for_a_seed():
    s = make_samples(300, 0)
    p1, m1 = train_global(s, epochs=1, seed=3, catalog=CATALOG)
    p2, m2 = train_global(s, epochs=1, seed=3, catalog=CATALOG)
    p3, _ = train_global(s, epochs=1, seed=4, catalog=CATALOG)
    assert p1 == p2 and m1 == m2 and p1 != p3
    out = subprocess.run([sys.executable, "-c", _CHILD.format(path=__file__)], capture_output=True,
                         text=True, check=True).stdout.split()[-1]
    assert out == hashlib.sha256(p1).hexdigest()


def test_global_model_rejects_bad_input():
    with pytest.raises(InvalidArgument, match="no training samples"):
        train_global([], epochs=1, seed=0, catalog=CATALOG)
    with pytest.raises(InvalidArgument, match="epochs"):
        train_global(make_samples(10, 0), epochs=0, seed=0, catalog=CATALOG)
    with pytest.raises(InvalidArgument, match="unknown din config"):
        train_global(make_samples(10, 0), epochs=1, seed=0, catalog=CATALOG, config={"layers": 3})
    with pytest.raises(InvalidArgument, match="n_items"):
        train_global(make_samples(10, 0), epochs=1, seed=0, catalog={"n_cats": 8})
