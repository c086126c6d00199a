"""A task can hurt only itself (issue 10 items 1 and 2), through a real platform, the real device host and
the real sandbox, in both sandbox profiles:

* whatever a task returns, raises or prints, its run ends in exactly one run report on the platform;
* what a message may expand into is bounded (depth, values), not only its bytes;
* host ops run under the run's wall and CPU budget, are cancelled with it, and a declared cost over what
  the run has left is refused before the op starts;
* bytes a task can put in the up-tunnel queue and in events are capped, the queue file shrinks once it
  drains, and trigger loops are stopped and reported (also `walle device run --once` exits).
"""
import json
import threading
import time

import pytest

from walle.device_host import budget, triggers, tunnel
from walle.device_host.host import DeviceHost
from walle.device_host.hostapi import MAX_RUN_EVENT_BYTES, HostAPI
from walle.device_host.identity import Credentials
from walle.device_host.sandbox import Limits, Sandbox, protocol
from walle.device_host.storage import TaskStorage
from walle.platform.manifest import validate_task_dir
from walle.platform.server import build_server
from walle.platform.service import Platform
from walle.protos import admin_pb2, bundle

PROFILES = ("native", "android_sim")

TOML = """name = "{name}"
entry = "main.py"
apis = [{apis}]
min_host_version = "0.1.0"
[limits]
memory_mb = {memory_mb}
cpu_seconds = {cpu}
wall_seconds = {wall}
{triggers}
"""


@pytest.fixture(scope="module", params=PROFILES)
def sandbox(request):
    sb = Sandbox(profile=request.param)
    yield sb
    sb.close()


class World:
    """A platform serving on a real socket and one enrolled device host with the given tasks installed."""

    def __init__(self, tmp_path, sandbox, tasks: dict):
        self.platform = Platform(tmp_path / "platform")
        _server, self.port, self._stop = build_server(self.platform, port=0)
        for name, spec in tasks.items():
            src = tmp_path / "src" / name
            src.mkdir(parents=True)
            apis = ", ".join(f'"{a}"' for a in spec.get("apis", ["log"]))
            (src / "task.toml").write_text(TOML.format(
                name=name, apis=apis, memory_mb=spec.get("memory_mb", 128), cpu=spec.get("cpu", 5),
                wall=spec.get("wall", 20), triggers=spec.get("triggers", "")))
            (src / "main.py").write_text(spec["main"])
            _m, files = validate_task_dir(src)
            tv = self.platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), author="t"))
            self.platform.CreateRelease(admin_pb2.CreateReleaseRequest(task=name, version=tv.version))
        self.token = self.platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="phone")).token
        self.host = DeviceHost(tmp_path / "device", f"127.0.0.1:{self.port}", sandbox=sandbox,
                               credentials=Credentials("phone", self.token))
        assert sorted(self.host.sync_now().installed) == sorted(f"{n}@{self.platform.repo.get(n).version}"
                                                                 for n in tasks)

    def reports(self, task: str) -> list[tuple[str, str, str]]:
        """(status, error, trigger) of every run report of `task` the platform holds."""
        assert self.host.up.flush(timeout=30)
        return [(r["status"], r["error"], r["trigger"]) for r in self.platform.state.reports("run_report")
                if r["task"] == task]

    def close(self) -> None:
        self.host.close()
        self._stop(0)


@pytest.fixture
def world(tmp_path, sandbox):
    made = []

    def make(tasks):
        made.append(World(tmp_path, sandbox, tasks))
        return made[-1]

    yield make
    for w in made:
        w.close()


# -- 1. every run ends in exactly one run report ----------------------------------------------------------

BAD_TASKS = {
    # name: (script, memory_mb, expected status, text expected in the report's error)
    "deepresult": ("def main(event):\n    x = []\n    for _ in range(985):\n        x = [x]\n    return x\n",
                   128, "protocol", f"deeper than {protocol.MAX_DEPTH} levels"),
    "forgedresult": ("def main(event):\n    return {'__ndarray__': 5, 'dtype': 'float32', 'shape': [1]}\n",
                     128, "protocol", "bad ndarray encoding"),
    "forgedarg": ("from walle import storage\ndef main(event):\n"
                  "    return storage.get('k', {'__ndarray__': 'AAAA', 'dtype': ['x'], 'shape': [1]})\n",
                  128, "protocol", "bad json: TypeError"),
    "nestedarg": ("from walle import storage\ndef main(event):\n"
                  "    return storage.get('k', [[] for _ in range(2_700_000)])\n",
                  1024, "protocol", f"over the {protocol.MAX_CONTAINERS} limit"),
    "surrogate": ("def main(event):\n    raise ValueError('hidden \\ud800 failure')\n",
                  128, "error", "ValueError: hidden ? failure"),
    "biglogs": ("from walle import log\ndef main(event):\n    for i in range(1000):\n"
                "        log.info(str(i) + ' ' + 'x' * 4000)\n    print('\\ud800 end')\n    return 'done'\n",
                128, "ok", ""),
}


@pytest.mark.parametrize("name", sorted(BAD_TASKS))
def test_every_run_ends_in_exactly_one_run_report(world, name):
    script, memory_mb, status, error = BAD_TASKS[name]
    w = world({name: {"apis": ["log", "storage"], "main": script, "memory_mb": memory_mb}})
    res = w.host.run_task(name)
    assert res.status == status, res
    reports = w.reports(name)
    assert len(reports) == 1 and reports[0][0] == status and error in reports[0][1], reports
    assert w.host.run_task(name).status == status  # the host and its worker are still fine
    if name == "biglogs":
        (lines,) = [json.loads(r["payload"])["lines"] for r in w.platform.state.reports("log")[:1]]
        assert "earlier log line(s) truncated" in lines[0]
        assert lines[-1] == "? end" and lines[-2].startswith("info: 999 ")


def test_decode_raises_only_protocol_error():
    bad = [b'{"__ndarray__": 5, "dtype": "float32", "shape": [1]}', b'{"__ndarray__": "AA==", "dtype": [1], "shape": [1]}',
           b'{"__ndarray__": "AAAA", "dtype": "float32", "shape": [7]}', b"[" * 985 + b"]" * 985, b"\xff\xfe",
           b"[" + b",".join([b"[]"] * (protocol.MAX_CONTAINERS + 1)) + b"]",
           b"[" + b",".join([b"1"] * (protocol.MAX_ITEMS + 1)) + b"]", b'{"a": 1e999999999999}']
    for data in bad[:-1]:
        with pytest.raises(protocol.ProtocolError):
            protocol.decode(data)
    # structure characters inside strings are not structure
    assert protocol.decode(json.dumps(["[" * 100 + "," * 600_000]).encode()) == ["[" * 100 + "," * 600_000]
    assert protocol.decode(b"[" * protocol.MAX_DEPTH + b"]" * protocol.MAX_DEPTH) is not None


def test_structure_inside_strings_is_found_the_same_with_and_without_escapes():
    """check_expansion's fast scan (split at quotes, used when no string holds an escape) sees the
    same structure as the exact string pattern, on random JSON and on both sides of the limits."""
    import random
    rng = random.Random(3)
    alphabet = 'ab[]{},"\\\n/:'

    def value(depth=0):
        r = rng.random()
        if depth > 4 or r < 0.35:
            return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        if r < 0.7:
            return [value(depth + 1) for _ in range(rng.randint(0, 4))]
        return {"".join(rng.choice(alphabet) for _ in range(3)): value(depth + 1) for _ in range(rng.randint(0, 3))}
    keep = bytes(c for c in range(256) if c not in b'[]{},')
    for _ in range(2000):
        data = json.dumps(value()).encode()
        assert protocol._outside_strings(data).translate(None, keep) == protocol._STRING.sub(b"", data).translate(None, keep)
    deep = b"[" * (protocol.MAX_DEPTH + 1) + b"]" * (protocol.MAX_DEPTH + 1)
    for text in ('"[[[[ plain"', '"[[[[ with \\" an escape"'):
        framed = (b'[' + text.encode() + b',' + deep[1:-1] + b']')
        with pytest.raises(protocol.ProtocolError, match="deeper"):
            protocol.decode(framed)
        shallow = b'[' + text.encode() + b',"' + b"[" * 70 + b'"]'  # 70 brackets, all inside a string
        assert protocol.decode(shallow) == [json.loads(text), "[" * 70]


# -- 1. host work is charged to the run ---------------------------------------------------------------

CALLS_OP = "from walle import test\ndef main(event):\n    return test.op()\n"


def _run_op(sandbox, tmp_path, op, cost=None, limits=Limits(memory_mb=64, cpu_seconds=1, wall_seconds=2)):
    if cost is not None:
        budget.declare_cost(op, cost)
    api = HostAPI(TaskStorage(tmp_path / "s.sqlite3"), "t", extra_ops={"test.op": op})
    return sandbox.run({"main.py": CALLS_OP}, "main.py", {}, limits=limits, api_handler=api,
                       allowed_apis={"test.op"})


def _until_no_op_lingers(owner="t"):
    deadline = time.monotonic() + 10
    while True:
        try:
            return budget.admit_new_op(owner)
        except Exception:
            assert time.monotonic() < deadline, "the abandoned op never ended"
            time.sleep(0.02)


def test_the_deadline_ends_the_run_while_a_host_op_executes(sandbox, tmp_path):
    release, seen = threading.Event(), []

    def stuck_op():  # ignores the budget: the run must still end at its deadline
        release.wait(15)
        seen.append(budget.current().cancelled)

    res = _run_op(sandbox, tmp_path, stuck_op)
    assert res.status == "timeout", res
    assert sandbox.run({"main.py": "def main(event):\n    return 42\n"}, "main.py", {}).value == 42  # worker back
    # while the abandoned op still executes, the same task gets no new host work
    res = _run_op(sandbox, tmp_path, lambda: 1)
    assert res.status == "error" and "still finishing" in res.error, res
    release.set()
    _until_no_op_lingers()

    def polite_op():  # checks the budget: stops as soon as the run is over
        while True:
            try:
                budget.check()
            except Exception as exc:
                seen.append(type(exc).__name__)
                return
            time.sleep(0.01)

    assert _run_op(sandbox, tmp_path, polite_op).status == "timeout"
    deadline = time.monotonic() + 10
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen == [True, "ResourceExhausted"]


def test_host_cpu_is_charged_to_the_run(sandbox, tmp_path):
    stop = threading.Event()

    def spin_op():
        t0 = time.thread_time()
        while not stop.is_set() and time.thread_time() - t0 < 10:
            pass

    res = _run_op(sandbox, tmp_path, spin_op, limits=Limits(memory_mb=64, cpu_seconds=1, wall_seconds=60))
    stop.set()
    _until_no_op_lingers()
    assert res.status == "cpu_limit" and "host work" in res.error, res
    assert res.host_cpu_s == 0  # the op never finished; the watchdog gave up on it


def test_task_cpu_plus_host_cpu_stays_within_the_limit(sandbox, tmp_path):
    def costly_op():  # finishes within the budget, but uses most of it
        t0 = time.thread_time()
        while time.thread_time() - t0 < 2.0:
            pass

    script = "from walle import test\ndef main(event):\n    test.op()\n    while True:\n        pass\n"
    api = HostAPI(TaskStorage(tmp_path / "s.sqlite3"), "t", extra_ops={"test.op": costly_op})
    limits = Limits(memory_mb=64, cpu_seconds=3, wall_seconds=60)
    res = sandbox.run({"main.py": script}, "main.py", {}, limits=limits, api_handler=api, allowed_apis={"test.op"})
    assert res.status == "cpu_limit" and "host work" in res.error and res.host_cpu_s >= 2.0, res
    # killed when its own CPU reached the 1 s the host's 2 s left of the limit, not at its own 3 s rlimit
    assert res.cpu_s < 2.5, res


def test_a_declared_cost_over_the_budget_is_refused_before_the_op_starts(sandbox, tmp_path):
    ran = []
    res = _run_op(sandbox, tmp_path, lambda: ran.append(1), cost=lambda: budget.Cost(cpu_s=3600))
    assert res.status == "error" and "ResourceExhausted" in res.error and "s of CPU" in res.error, res
    res = _run_op(sandbox, tmp_path, lambda: ran.append(1), cost=lambda: budget.Cost(memory_bytes=8 << 30))
    assert res.status == "error" and "MiB in the host" in res.error, res
    assert ran == []
    res = _run_op(sandbox, tmp_path, lambda: len(ran) + 7, cost=lambda: budget.Cost(cpu_s=0.01, memory_bytes=1024))
    assert res.status == "ok" and res.value == 7


# -- 2. quotas in bytes --------------------------------------------------------------------------------

FLOOD = """from walle import tunnel
def main(event):
    n = 0
    while True:
        try:
            tunnel.up("task.flood", "x" * 200_000)
        except Exception as e:
            return [n, str(e)]
        n += 1
"""

EVENT_FLOOD = """from walle import events
def main(event):
    n = 0
    while True:
        try:
            events.emit("nobody.listens", "x" * 60_000)
        except Exception as e:
            return [n, str(e)]
        n += 1
"""


def _queue_file_bytes(host) -> int:
    return sum(p.stat().st_size for p in host.data_dir.glob("tunnel.sqlite3*"))


def test_up_tunnel_bytes_are_capped_per_run_and_per_task_and_space_is_reclaimed(world):
    w = world({"flood": {"apis": ["tunnel"], "main": FLOOD}})
    w.host.up.task_max_bytes = 6 << 20
    n, error = w.host.run_task("flood").value
    assert "ResourceExhausted" in error and "per run" in error
    assert w.host.up.owner_bytes("flood") == n * 200_002 <= tunnel.RUN_MAX_BYTES < (n + 1) * 200_002
    n2, error = w.host.run_task("flood").value
    assert "ResourceExhausted" in error and "share" in error, error
    assert w.host.up.owner_bytes("flood") <= 6 << 20
    full = _queue_file_bytes(w.host)
    assert w.reports("flood") and w.host.up.pending() == 0  # flushed
    assert w.host.up.owner_bytes("flood") == 0
    assert _queue_file_bytes(w.host) < full / 2, (full, _queue_file_bytes(w.host))
    n3, error = w.host.run_task("flood").value  # the share is free again
    assert n3 == n and "per run" in error


def test_events_are_capped_in_bytes_per_run(world):
    w = world({"eventflood": {"apis": ["events"], "main": EVENT_FLOOD}})
    n, error = w.host.run_task("eventflood").value
    assert "ResourceExhausted" in error and "per run" in error
    assert n * 60_002 <= MAX_RUN_EVENT_BYTES


LOOP = "from walle import events\ndef main(event):\n    events.emit('again', {})\n    return 1\n"
TABLE_LOOP = "from walle import storage\ndef main(event):\n    storage.insert('rows', [{'x': 1}])\n    return 1\n"


def test_a_task_that_triggers_itself_is_stopped_and_reported(world):
    w = world({"loop": {"apis": ["events"], "main": LOOP, "triggers": '[[triggers]]\nkind = "event"\nevent = "again"'},
               "tableloop": {"apis": ["storage"], "main": TABLE_LOOP,
                             "triggers": '[[triggers]]\nkind = "table_rows"\ntable = "rows"\nmin_rows = 1'}})
    assert w.host.emit("again", {}) == ["loop"]
    assert w.host.triggers.drain() == triggers.MAX_CHAIN_DEPTH + 1
    reports = w.reports("loop")
    assert [r[0] for r in reports] == ["ok"] * (triggers.MAX_CHAIN_DEPTH + 1) + ["refused"]
    assert "trigger loop stopped" in reports[-1][1] and reports[-1][2] == "event:again"

    w.host.triggers.clock = lambda: 0.0  # no refill while the test runs: exactly RATE_BURST runs
    w.host.run_task("tableloop")  # its own insert re-fires its table_rows trigger after every run
    w.host.triggers.check_tables()
    assert w.host.triggers.drain() == triggers.RATE_BURST
    reports = w.reports("tableloop")
    assert [r[0] for r in reports] == ["ok"] * (triggers.RATE_BURST + 1) + ["refused"]
    assert "trigger rate limit" in reports[-1][1]


def test_device_run_once_exits_on_a_trigger_loop(world, tmp_path, sandbox):
    from click.testing import CliRunner

    from walle.device_host.cli import device_run
    w = world({"loop": {"apis": ["events"], "main": LOOP, "triggers": '[[triggers]]\nkind = "event"\nevent = "again"'}})
    cred = tmp_path / "cred.json"
    token = w.platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="cli-phone")).token
    Credentials("cli-phone", token, f"127.0.0.1:{w.port}").save(cred)
    res = CliRunner().invoke(device_run, ["--data-dir", str(tmp_path / "cli-device"), "--token-file", str(cred),
                                          "--profile", sandbox.profile, "--once", "--event", "again"])
    assert res.exit_code == 0, res.output
    statuses = [r[0] for r in w.reports("loop")]
    assert statuses.count("ok") == triggers.MAX_CHAIN_DEPTH + 1 and statuses.count("refused") == 1


def test_a_reply_the_child_would_refuse_becomes_the_tasks_error(sandbox, tmp_path):
    script = ("from walle import test\ndef main(event):\n    try:\n        test.op()\n"
              "    except HostAPIError as e:\n        return str(e)\n")
    api = HostAPI(TaskStorage(tmp_path / "s.sqlite3"), "t", extra_ops={"test.op": lambda: [0] * (protocol.MAX_ITEMS + 1)})
    res = sandbox.run({"main.py": script}, "main.py", {}, api_handler=api, allowed_apis={"test.op"})
    assert res.status == "ok" and "ResourceExhausted" in res.value and "values" in res.value, res


def test_a_run_the_host_cannot_start_is_still_reported(world):
    w = world({"plain": {"main": "def main(event):\n    return 1\n"}})
    res = w.host.run_task("plain", {"x": float("nan")})  # Sandbox.run refuses an event that is not JSON
    assert res.status == "refused" and "event is not JSON" in res.error
    assert [r[0] for r in w.reports("plain")] == ["refused"]
    assert w.host.stats == {"runs": 1, "ok": 0, "failed": 1}
