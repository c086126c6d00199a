"""Sandbox behaviour: results, logs, host API round trips, resource-limit classification, MNN training."""
from __future__ import annotations

import ctypes
import os
import threading

import pytest

from walle.device_host.hostapi import HostAPI
from walle.device_host.sandbox import Limits, Sandbox, seccomp
from walle.device_host.storage import TaskStorage
from walle.platform.errors import InvalidArgument

TRIVIAL = {"main.py": "def main(event):\n    return 42\n"}


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2) as sb:
        yield sb


def run(sb: Sandbox, source: str, event: dict | None = None, limits: Limits | None = None, **kw):
    return sb.run({"main.py": source}, "main.py", event or {}, limits=limits or Limits(), **kw)


def test_capabilities_native(sandbox):
    caps = sandbox.capabilities
    assert caps["profile"] == "native" and caps["confined"] is True
    assert caps["seccomp"] is True and caps["rlimits"] is True and caps["restricted_python"] is True
    assert isinstance(caps["landlock"], int)


def test_trivial_task_returns_42(sandbox):
    res = sandbox.run(TRIVIAL, "main.py", {}, limits=Limits())
    assert (res.status, res.value, res.error) == ("ok", 42, "")
    assert res.duration_s > 0 and res.peak_memory_kb > 0


def test_event_round_trip_and_logs(sandbox):
    src = "def main(event):\n    print('got', event['name'])\n    print('n =', len(event['payload']['xs']), end='!')\n" \
          "    return {'sum': sum(event['payload']['xs'])}\n"
    res = run(sandbox, src, {"name": "batch_received", "payload": {"xs": [1, 2, 3]}})
    assert res.status == "ok" and res.value == {"sum": 6}
    assert res.logs == ["got batch_received", "n = 3!"]


def test_logs_are_capped(sandbox):
    res = run(sandbox, "def main(event):\n    for i in range(20000):\n        print('x' * 50)\n    return 1\n")
    assert res.status == "ok"
    assert sum(len(l) for l in res.logs) <= 64 * 1024 + 100
    assert "truncated" in res.logs[-1]


def test_hello_task_with_real_storage(sandbox, tmp_path):
    store = TaskStorage(tmp_path / "device.db")
    src = (
        "from walle import storage, events, log\n"
        "def main(event):\n"
        "    runs = storage.get('runs', 0) + 1\n"
        "    storage.put('runs', runs)\n"
        "    storage.insert('clicks', [{'item': i, 'score': i / 10} for i in range(5)])\n"
        "    top = storage.query('clicks', where={'score': {'ge': 0.2}}, order_by='-score', limit=2)\n"
        "    log.info('hello run ' + str(runs))\n"
        "    events.emit('hello.done', {'runs': runs})\n"
        "    return {'runs': runs, 'top': [r['item'] for r in top], 'n': storage.count('clicks')}\n"
    )
    for expected_runs in (1, 2):
        api = HostAPI(store, "hello")
        res = run(sandbox, src, api_handler=api, allowed_apis=api.allowed_apis())
        assert res.status == "ok", res.error
        top = [4, 3] if expected_runs == 1 else [4, 4]  # the second run inserted the rows again
        assert res.value == {"runs": expected_runs, "top": top, "n": 5 * expected_runs}
        assert api.events == [{"name": "hello.done", "payload": {"runs": expected_runs}}]
        assert api.logs == [{"level": "info", "message": f"hello run {expected_runs}"}]
    assert store.get("hello", "runs") == 2


def test_host_api_errors_reach_the_task(sandbox, tmp_path):
    api = HostAPI(TaskStorage(tmp_path / "d.db"), "t1")
    src = (
        "from walle import storage, HostAPIError\n"
        "def main(event):\n"
        "    out = []\n"
        "    for call in (lambda: storage.get('../../etc/passwd'), lambda: storage.get('k', sql='DROP'),\n"
        "                 lambda: storage.nope(), lambda: storage.query('x; DROP TABLE walle_kv')):\n"
        "        try:\n"
        "            call()\n"
        "        except HostAPIError as e:\n"
        "            out.append(str(e))\n"
        "    return out\n"
    )
    res = run(sandbox, src, api_handler=api, allowed_apis=api.allowed_apis() | {"storage.nope"})
    assert res.status == "ok"
    assert "storage.get" in res.value[0] and "InvalidArgument" in res.value[0] and ".." in res.value[0]
    assert "unexpected keyword argument 'sql'" in res.value[1]
    assert "unknown host API op 'storage.nope'" in res.value[2]
    assert "table name" in res.value[3]


def test_disallowed_api_never_reaches_handler(sandbox):
    calls = []
    src = "from walle import model\ndef main(event):\n    return model.train(1)\n"
    res = run(sandbox, src, api_handler=lambda op, a, k: calls.append(op), allowed_apis={"storage.get"})
    assert res.status == "error"
    assert "HostAPIError" in res.error and "model.train" in res.error and "not an allowed API" in res.error
    assert calls == []


def test_ndarray_crosses_the_boundary(sandbox):
    got = {}

    def handler(op, args, kwargs):
        got["arg"] = args[0]
        return args[0] * 2

    src = ("import numpy as np\nfrom walle import model\n"
           "def main(event):\n    w = model.scale(np.arange(6, dtype=np.float32).reshape(2, 3))\n"
           "    return {'shape': list(w.shape), 'dtype': str(w.dtype), 'sum': float(w.sum()), 'w': w}\n")
    res = run(sandbox, src, api_handler=handler, allowed_apis={"model.scale"})
    assert res.status == "ok", res.error
    assert got["arg"].shape == (2, 3) and got["arg"].dtype.name == "float32"
    assert res.value["shape"] == [2, 3] and res.value["dtype"] == "float32" and res.value["sum"] == 30.0
    assert res.value["w"].tolist() == [[0, 2, 4], [6, 8, 10]]


def test_multi_file_bundle(sandbox):
    files = {
        "main.py": "import helpers\nfrom pkg.util import double\nfrom pkg import util\n"
                   "def main(event):\n    return [helpers.triple(2), double(5), util.NAME]\n",
        "helpers.py": "import math\ndef triple(x):\n    return int(math.floor(x * 3))\n",
        "pkg/__init__.py": "",
        "pkg/util.py": "NAME = 'util'\ndef double(x):\n    return 2 * x\n",
    }
    res = sandbox.run(files, "main.py", {}, limits=Limits())
    assert res.status == "ok" and res.value == [6, 10, "util"]


def test_compile_error_and_runtime_error_are_reported(sandbox):
    res = run(sandbox, "def main(event):\n    return ().__class__\n")
    assert res.status == "error" and "SyntaxError" in res.error and "__class__" in res.error
    res = run(sandbox, "def main(event):\n    x = 1\n    return x / 0\n")
    assert res.status == "error" and res.error.startswith("ZeroDivisionError")
    assert 'main.py", line 3' in res.error  # guest traceback, from the bundle's own source


def test_bad_bundle_is_rejected_on_the_host(sandbox):
    with pytest.raises(InvalidArgument, match="entry"):
        sandbox.run(TRIVIAL, "nope.py", {}, limits=Limits())
    with pytest.raises(InvalidArgument, match=r"\.\."):
        sandbox.run({"../x.py": "", "main.py": ""}, "main.py", {}, limits=Limits())
    with pytest.raises(InvalidArgument, match="memory_mb"):
        sandbox.run(TRIVIAL, "main.py", {}, limits=Limits(memory_mb=1))


def test_wall_clock_timeout(sandbox):
    res = run(sandbox, "def main(event):\n    while True:\n        pass\n", limits=Limits(cpu_seconds=30, wall_seconds=1))
    assert res.status == "timeout"
    assert 1.0 <= res.duration_s <= 1.5


def test_cpu_limit_cannot_be_caught(sandbox):
    src = ("def main(event):\n    n = 0\n    while True:\n        try:\n            while True:\n"
           "                n += 1\n        except BaseException:\n            pass\n")
    res = run(sandbox, src, limits=Limits(cpu_seconds=1, wall_seconds=10))
    assert res.status == "cpu_limit", res


def test_memory_bomb(sandbox):
    src = "import numpy as np\ndef main(event):\n    xs = []\n    while True:\n        xs.append(np.ones(1 << 20))\n"
    res = run(sandbox, src, limits=Limits(memory_mb=128))
    assert res.status == "memory", res
    res = run(sandbox, "import numpy as np\ndef main(event):\n    return np.ones(1 << 40).sum()\n")
    assert res.status == "memory"


def test_segfault_is_crashed(sandbox):
    # MNN does not check allocation failures (sandbox-notes section 2): growth under RLIMIT_AS -> SIGSEGV.
    src = ("import MNN\nimport numpy as np\nF = MNN.expr\ndef main(event):\n    keep = []\n    while True:\n"
           "        keep.append(F.const(np.ones(1 << 20, dtype=np.float32), [1 << 20]) * 2.0)\n        keep[-1].read()\n")
    res = run(sandbox, src, limits=Limits(memory_mb=96, cpu_seconds=20, wall_seconds=20))
    assert res.status == "crashed" and "SIGSEGV" in res.error, res
    assert sandbox.run(TRIVIAL, "main.py", {}, limits=Limits()).value == 42


def test_oversized_result_is_protocol(sandbox):
    res = run(sandbox, "def main(event):\n    return 'x' * (9 * 1024 * 1024)\n")
    assert res.status == "protocol" and "too large" in res.error


def test_non_json_result_is_error(sandbox):
    res = run(sandbox, "def main(event):\n    return {1, 2}\n")
    assert res.status == "error" and "not JSON" in res.error
    res = run(sandbox, "def main(event):\n    return float('nan')\n")
    assert res.status == "error" and "not JSON" in res.error


MNN_TRAINING = '''
import numpy as np
import MNN
nn, F, optim = MNN.nn, MNN.expr, MNN.optim
_F = F._F

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.linear(4, 16)
        self.fc2 = nn.linear(16, 1)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))

def bce_with_logits(z, t):
    return _F.reduce_mean(F.relu(z) - z * t + _F.log1p(_F.exp(-F.abs(z))), [], False)

def main(event):
    F.lazy_eval(True)
    rng = np.random.default_rng(event["seed"])
    X = rng.normal(size=(256, 4)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.float32).reshape(256, 1)
    net = Net()
    opt = optim.ADAM(net, 0.02)
    losses = []
    for step in range(60):
        loss = bce_with_logits(net.forward(F.const(X, [256, 4])), F.const(y, [256, 1]))
        if step % 20 == 0:
            losses.append(float(loss.read()))
        assert opt.step(loss)
    final = bce_with_logits(net.forward(F.const(X, [256, 4])), F.const(y, [256, 1]))
    losses.append(float(final.read()))
    print("losses", losses)
    return losses
'''


def test_mnn_training_inside_the_sandbox(sandbox):
    res = run(sandbox, MNN_TRAINING, {"seed": 3}, limits=Limits(memory_mb=256, cpu_seconds=20, wall_seconds=30))
    assert res.status == "ok", res.error
    losses = res.value
    assert len(losses) == 4 and losses[-1] < 0.6 * losses[0]
    assert res.logs and res.logs[0].startswith("losses")


def test_concurrent_runs_from_threads(sandbox):
    results = [None] * 8

    def worker(i: int) -> None:
        results[i] = run(sandbox, "def main(event):\n    return event['i'] * 2\n", {"i": i})

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [(r.status, r.value) for r in results] == [("ok", 2 * i) for i in range(8)]


def test_zygote_restart_every_n_runs():
    with Sandbox(restart_every=3) as sb:
        pids = set()
        for _ in range(7):
            assert sb.run(TRIVIAL, "main.py", {}, limits=Limits()).value == 42
            pids |= {z.pid for z in sb._all}
        assert len(pids) == 3  # 7 runs, restart after every 3rd


def test_dead_zygote_is_replaced():
    with Sandbox() as sb:
        (z,) = sb._all
        os.kill(z.pid, 9)
        z.proc.wait()
        assert sb.run(TRIVIAL, "main.py", {}, limits=Limits()).value == 42
        assert {x.pid for x in sb._all} != {z.pid}


def test_closed_sandbox_refuses():
    sb = Sandbox()
    sb.close()
    with pytest.raises(Exception, match="closed"):
        sb.run(TRIVIAL, "main.py", {}, limits=Limits())


def test_android_sim_capabilities_and_run():
    with Sandbox(profile="android_sim") as sb:
        caps = sb.capabilities
        assert caps["profile"] == "android_sim"
        assert caps["landlock"] == 0 and caps["landlock_detail"] == "killed:SIGSYS"
        assert caps["close_range"] is False and caps["close_range_detail"] == "killed:SIGSYS"
        assert caps["seccomp"] is True and caps["confined"] is True  # prctl path still works
        assert sb.run(TRIVIAL, "main.py", {}, limits=Limits()).value == 42
        res = sb.run({"main.py": MNN_TRAINING}, "main.py", {"seed": 1}, limits=Limits(cpu_seconds=20))
        assert res.status == "ok" and res.value[-1] < res.value[0]


def test_seccomp_tables_match_libseccomp():
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        pytest.fail("libseccomp.so.2 is expected on this machine (Debian libseccomp2) to cross-check tables")
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    for arch, (table, audit, _) in seccomp.ARCHES.items():
        token = lib.seccomp_arch_resolve_name(arch.encode())
        assert token == audit
        wrong = {n: (nr, lib.seccomp_syscall_resolve_name_arch(token, n.encode())) for n, nr in table.items()
                 if lib.seccomp_syscall_resolve_name_arch(token, n.encode()) != nr}
        assert wrong == {}, arch


def test_filter_fails_closed_on_unknown_arch():
    with pytest.raises(seccomp.UnsupportedArch):
        seccomp.build_task_filter("none", 1, arch="armv7l")
    with pytest.raises(ValueError):
        seccomp.build_task_filter("write", 1)


def test_refused_when_unconfined(monkeypatch):
    with Sandbox() as sb:
        sb.capabilities["confined"] = False  # as on a platform where both probes failed
        res = sb.run(TRIVIAL, "main.py", {}, limits=Limits())
        assert res.status == "refused" and "allow_unconfined" in res.error
        sb.allow_unconfined = True
        assert sb.run(TRIVIAL, "main.py", {}, limits=Limits()).value == 42


def test_a_device_without_mnn_still_runs_tasks_and_refuses_mnn_clearly():
    """Termux has no MNN wheel: the sandbox must still start and run plain tasks."""
    from walle.device_host.sandbox import Limits, Sandbox
    with Sandbox(profile="android_sim", mnn=False) as sb:
        plain = sb.run({"main.py": "import numpy as np\ndef main(event):\n    return int(np.arange(5).sum())\n"},
                       "main.py", {}, limits=Limits(memory_mb=128, cpu_seconds=5, wall_seconds=10),
                       api_handler=None, allowed_apis=set())
        assert plain.status == "ok" and plain.value == 10
        needs = sb.run({"main.py": "import MNN\ndef main(event):\n    return 1\n"}, "main.py", {},
                       limits=Limits(memory_mb=128, cpu_seconds=5, wall_seconds=10), api_handler=None,
                       allowed_apis=set())
        assert needs.status == "error" and "MNN is not installed on this device" in needs.error
