"""Adversarial task scripts (sandbox-notes section 6), run under both profiles.

Every case asserts a classified non-ok outcome (or the specific refusal the script caught), that the
planted secret never shows up in the result/logs/error, that no file appeared in a world-writable
watched directory, and that the next trivial task still returns 42 (host and zygote healthy).
The second half runs raw Python (no RestrictedPython: as if that layer were bypassed) in a child
hardened by the same child.harden() and checks the OS layers alone stop sockets, fork/exec, signals,
ptrace, file reads and writes.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import tempfile

import pytest

from walle.device_host.hostapi import HostAPI
from walle.device_host.sandbox import Limits, Sandbox, child, seccomp
from walle.device_host.storage import TaskStorage

SECRET = "TOKEN=walle-secret-7f3a9c"
TRIVIAL = {"main.py": "def main(event):\n    return 42\n"}
PROFILES = ["native", "android_sim"]


@pytest.fixture(scope="module")
def arena():
    """A readable secret and a world-writable watched dir outside pytest's 0700 tmp tree, so only the
    sandbox layers (not file permissions) keep a dropped-privilege child away from them."""
    root = tempfile.mkdtemp(prefix="walle-escape-")
    os.chmod(root, 0o755)
    secret = os.path.join(root, "secret.txt")
    with open(secret, "w") as f:
        f.write(SECRET)
    os.chmod(secret, 0o644)
    watch = os.path.join(root, "watched")
    os.mkdir(watch)
    os.chmod(watch, 0o777)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    tcp.setblocking(False)
    name = f"\0walle-escape-{os.getpid()}"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(name)
    unix.listen(16)
    unix.setblocking(False)
    yield {"secret": secret, "watch": watch, "host_pid": os.getpid(), "port": tcp.getsockname()[1],
           "abstract": name[1:], "tcp": tcp, "unix": unix}
    tcp.close()
    unix.close()
    shutil.rmtree(root)


@pytest.fixture(scope="module", params=PROFILES)
def sandbox(request):
    with Sandbox(profile=request.param) as sb:
        yield sb


def _no_connection(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


def _event(arena: dict) -> dict:
    return {k: arena[k] for k in ("secret", "watch", "host_pid", "port", "abstract")}


# (id, source, allowed statuses, substring expected in error)
ESCAPES = [
    ("subclass_walk", "def main(event):\n    return [c.__name__ for c in ().__class__.__base__.__subclasses__()]\n",
     {"error"}, "SyntaxError"),
    ("traceback_frame_walk", "def main(event):\n    try:\n        1 / 0\n    except Exception as e:\n"
     "        return str(e.__traceback__.tb_frame.f_back.f_builtins)\n", {"error"}, "SyntaxError"),
    ("generator_frame", "def main(event):\n    g = (i for i in [1])\n    return str(g.gi_frame.f_back)\n",
     {"error"}, "SyntaxError"),
    ("dynamic_gi_frame", "def main(event):\n    g = (i for i in [1])\n    return str(getattr(g, 'gi_' + 'frame'))\n",
     {"error"}, "AttributeError"),
    ("dynamic_dunder_getattr", "def main(event):\n    b = getattr(len, '__se' + 'lf__')\n"
     "    return b.open(event['secret']).read()\n", {"error"}, "AttributeError"),
    ("str_format_traversal", "def main(event):\n    return '{0.__self__.open}'.format(len)\n", {"error"}, "AttributeError"),
    ("str_format_via_class", "def main(event):\n    f = getattr(str, 'format')\n    return f('{0.__self__}', len)\n",
     {"error"}, "AttributeError"),
    ("str_format_nested_spec", "def main(event):\n    return '{:{0.__class__}}'.format(1)\n", {"error"}, "AttributeError"),
    ("str_format_map_index", "def main(event):\n    return '{a[0]}'.format_map({'a': [event['secret']]})\n",
     {"error"}, "AttributeError"),
    ("fstring_dunder", "def main(event):\n    return f'{len.__self__}'\n", {"error"}, "SyntaxError"),
    ("import_os", "import os\ndef main(event):\n    return open(event['secret']).read()\n", {"error"}, "ImportError"),
    ("import_numpy_f2py", "import numpy.f2py\ndef main(event):\n    return 1\n", {"error"}, "ImportError"),
    ("from_numpy_import_f2py", "from numpy import f2py\ndef main(event):\n    return 1\n", {"error"}, "ImportError"),
    ("dunder_import", "def main(event):\n    return __import__('os').getcwd()\n", {"error"}, "SyntaxError"),
    ("import_socket", "import socket\ndef main(event):\n    s = socket.create_connection(('127.0.0.1', event['port']))\n",
     {"error"}, "ImportError"),
    ("import_subprocess", "import subprocess\ndef main(event):\n    return subprocess.run(['id'])\n", {"error"},
     "ImportError"),
    ("numpy_save", "import numpy as np\ndef main(event):\n    np.save(event['watch'] + '/x.npy', np.ones(3))\n",
     {"error"}, "AttributeError"),
    ("numpy_fromfile", "import numpy as np\ndef main(event):\n"
     "    return np.fromfile(event['secret'], dtype=np.uint8).tobytes().decode()\n", {"error"}, "AttributeError"),
    ("numpy_load_via_getattr", "import numpy as np\ndef main(event):\n    return str(getattr(np, 'lo' + 'ad')(event['secret']))\n",
     {"error"}, "AttributeError"),
    ("ndarray_tofile", "import numpy as np\ndef main(event):\n    np.ones(3).tofile(event['watch'] + '/y.bin')\n",
     {"error"}, "AttributeError"),
    ("ndarray_class_tofile", "import numpy as np\ndef main(event):\n    np.ndarray.tofile(np.ones(3), event['watch'] + '/z')\n",
     {"error"}, "AttributeError"),
    ("numpy_memmap", "import numpy as np\ndef main(event):\n    return np.memmap(event['secret'], mode='r').tobytes().decode()\n",
     {"error"}, "AttributeError"),
    ("as_strided_oob_read", "import numpy as np\ndef main(event):\n"
     "    return np.lib.stride_tricks.as_strided(np.zeros(1), shape=(1 << 20,), strides=(8,)).sum()\n",
     {"error"}, "AttributeError"),
    ("ctypeslib_system", "import numpy as np\ndef main(event):\n"
     "    return np.ctypeslib.ctypes.CDLL(None).system(b'touch ' + event['watch'].encode() + b'/pwned')\n",
     {"error"}, "AttributeError"),
    ("ndarray_ctypes_pointer", "import numpy as np\ndef main(event):\n    return np.zeros(4).ctypes.data\n",
     {"error"}, "AttributeError"),
    ("bit_generator_ctypes", "import numpy as np\ndef main(event):\n"
     "    return np.random.default_rng().bit_generator.ctypes.state_address\n", {"error"}, "AttributeError"),
    ("mnn_save_file", "import MNN\nF = MNN.expr\ndef main(event):\n    F.save([F.const([1.0], [1])], event['watch'] + '/m.mnn')\n",
     {"error"}, "AttributeError"),
    ("mnn_load_secret", "import MNN\nF = MNN.expr\ndef main(event):\n    return str(F.load_as_list(event['secret']))\n",
     {"error"}, "AttributeError"),
    ("mnn_raw_bindings_save", "import MNN\nF = MNN.expr\n_F = F._F\ndef main(event):\n"
     "    _F.save([F.const([1.0], [1])], event['watch'] + '/raw.mnn', False)\n", {"error"}, "AttributeError"),
    ("mnn_load_module_from_file", "import MNN\ndef main(event):\n"
     "    return str(MNN.nn.load_module_from_file(event['secret'], ['x'], ['y']))\n", {"error"}, "AttributeError"),
    ("mnn_var_ptr", "import MNN\nF = MNN.expr\ndef main(event):\n    return F.const([1.0], [1]).ptr\n",
     {"error"}, "AttributeError"),
    ("mnn_copy_to_device_ptr", "import MNN\nF = MNN.expr\ndef main(event):\n"
     "    F.const([1.0], [1]).copy_to_device_ptr(4096, 0)\n", {"error"}, "AttributeError"),
    ("mnn_set_thread_number", "import MNN\nF = MNN.expr\ndef main(event):\n    F.set_thread_number(4)\n",
     {"error"}, "AttributeError"),
    ("mnn_numpy_and_cv", "import MNN.numpy\ndef main(event):\n    return 1\n", {"error"}, "ImportError"),
    ("mnn_expr_np_module", "import MNN\ndef main(event):\n    return str(MNN.expr.np.f2py)\n", {"error"}, "AttributeError"),
    ("json_codecs_open", "import json\ndef main(event):\n    return json.codecs.open(event['secret']).read()\n",
     {"error"}, "AttributeError"),
    ("try_except_star", "def main(event):\n    try:\n        pass\n    except* ValueError:\n        pass\n",
     {"error"}, "SyntaxError"),
    ("posonly_getattr_shadowing", "def main(event, _getattr_=None, /):\n    return 1\n", {"error"}, "SyntaxError"),
    ("rebind_super", "super = len\ndef main(event):\n    return 1\n", {"error"}, "SyntaxError"),
    ("attribute_error_obj_leak", "import numpy as np\ndef main(event):\n    try:\n        np.nope\n"
     "    except AttributeError as e:\n        return repr(e.obj)\n", {"error"}, "AttributeError"),
    ("three_arg_type", "def main(event):\n    return str(type('X', (), {}))\n", {"error"}, "NameError"),
    ("vars_and_globals", "def main(event):\n    return str(globals())\n", {"error"}, "NameError"),
    ("setattr_namespace", "import numpy as np\ndef main(event):\n    setattr(np, 'sum', len)\n", {"error"}, "TypeError"),
    ("poison_json_dumps", "import json\ndef main(event):\n    json.dumps = lambda *a, **k: 'pwned'\n    return 1\n",
     {"error"}, "TypeError"),
    ("poison_builtin_class", "def main(event):\n    int.bit_length = len\n    return 1\n", {"error"}, "TypeError"),
    ("deep_recursion", "def f(n):\n    return f(n + 1)\ndef main(event):\n    return f(0)\n", {"error"}, "RecursionError"),
    ("memory_bomb", "import numpy as np\ndef main(event):\n    return float(np.ones(1 << 40).sum())\n", {"memory"}, "MemoryError"),
    ("memory_growth", "def main(event):\n    xs = []\n    while True:\n        xs.append('x' * (1 << 20))\n",
     {"memory"}, "MemoryError"),
    ("oversized_result", "def main(event):\n    return 'y' * (64 * 1024 * 1024)\n", {"protocol", "memory"}, ""),
    ("non_json_result", "def main(event):\n    return main\n", {"error"}, "not JSON"),
    ("host_api_dotdot_key", "from walle import storage\ndef main(event):\n    return storage.get('../../etc/passwd')\n",
     {"error"}, "InvalidArgument"),
    ("host_api_unknown_op", "from walle import storage\ndef main(event):\n    return storage.raw_sql('DROP TABLE walle_kv')\n",
     {"error"}, "not an allowed API"),
    ("host_api_unknown_kwarg", "from walle import storage\ndef main(event):\n"
     "    return storage.query('t', sql='SELECT * FROM walle_kv')\n", {"error"}, "unexpected keyword"),
    ("host_api_sql_table_name", "from walle import storage\ndef main(event):\n"
     "    return storage.insert('t\"; DROP TABLE walle_kv; --', [{'a': 1}])\n", {"error"}, "table name"),
    ("host_api_sql_column_name", "from walle import storage\ndef main(event):\n"
     "    return storage.insert('t', [{'a\" TEXT); DROP TABLE walle_kv; --': 1}])\n", {"error"}, "column name"),
    ("host_api_sql_where_column", "from walle import storage\ndef main(event):\n    storage.insert('t', [{'a': 1}])\n"
     "    return storage.query('t', where={'a = 1 OR 1': 1})\n", {"error"}, "column name"),
    ("host_api_sql_order_by", "from walle import storage\ndef main(event):\n    storage.insert('t', [{'a': 1}])\n"
     "    return storage.query('t', order_by='a; DROP TABLE walle_kv')\n", {"error"}, "column name"),
]
SLOW_ESCAPES = [
    ("cpu_spin_catching_base_exception", "def main(event):\n    while True:\n        try:\n            while True:\n"
     "                pass\n        except BaseException:\n            pass\n", {"cpu_limit"}, "CPU limit",
     Limits(cpu_seconds=1, wall_seconds=20)),
    ("bignum", "def main(event):\n    return str(10 ** (10 ** 9))[:5]\n", {"cpu_limit", "memory"}, "",
     Limits(memory_mb=192, cpu_seconds=1, wall_seconds=20)),
    ("blocking_wall_clock", "from walle import storage\ndef main(event):\n    while True:\n"
     "        storage.get('k')\n", {"timeout"}, "wall-clock", Limits(cpu_seconds=20, wall_seconds=1)),
]


def _check(sb: Sandbox, arena: dict, tmp_path, source: str, statuses: set, needle: str,
           limits: Limits | None = None) -> None:
    before = sorted(os.listdir(arena["watch"]))
    store = TaskStorage(tmp_path / "device.db")
    store.put("attacker", "k", "v")
    api = HostAPI(store, "attacker")
    limits = limits or Limits(memory_mb=192, cpu_seconds=5, wall_seconds=20)
    res = sb.run({"main.py": source}, "main.py", _event(arena), limits=limits, api_handler=api,
                 allowed_apis=api.allowed_apis())
    assert res.status in statuses, res
    assert needle in res.error, res
    blob = json.dumps([res.value, res.logs, res.error], default=str)
    assert SECRET not in blob and "walle-secret" not in blob
    assert sorted(os.listdir(arena["watch"])) == before
    assert _no_connection(arena["tcp"]) and _no_connection(arena["unix"])
    # the device's own storage survived the SQL-looking input
    assert store.get("attacker", "k") == "v"
    with sqlite3.connect(tmp_path / "device.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert sb.run(TRIVIAL, "main.py", {}, limits=Limits()).value == 42


@pytest.mark.parametrize("name,source,statuses,needle", ESCAPES, ids=[e[0] for e in ESCAPES])
def test_escape_is_contained(sandbox, arena, tmp_path, name, source, statuses, needle):
    _check(sandbox, arena, tmp_path, source, statuses, needle)


@pytest.mark.parametrize("name,source,statuses,needle,limits", SLOW_ESCAPES, ids=[e[0] for e in SLOW_ESCAPES])
def test_resource_escape_is_contained(sandbox, arena, tmp_path, name, source, statuses, needle, limits):
    _check(sandbox, arena, tmp_path, source, statuses, needle, limits)


def test_poisoned_module_does_not_leak_into_the_next_run(sandbox):
    # Even a task that swallows the refusal cannot change what the next (fresh fork) task sees.
    src = "import json\ndef main(event):\n    try:\n        json.dumps = len\n    except TypeError:\n        pass\n" \
          "    return json.dumps({'a': 1})\n"
    assert sandbox.run({"main.py": src}, "main.py", {}, limits=Limits()).value == '{"a": 1}'
    res = sandbox.run({"main.py": "import json\ndef main(event):\n    return json.dumps([1])\n"}, "main.py", {},
                      limits=Limits())
    assert res.value == "[1]"


def test_ordinary_code_still_works(sandbox):
    src = (
        "import numpy as np\nimport math, random, json\n"
        "class Acc:\n    def __init__(self):\n        self.total = 0\n    def add(self, v):\n        self.total += v\n"
        "def main(event):\n    a = Acc()\n    for i, x in enumerate([1, 2, 3]):\n        a.add(x * i)\n"
        "    w = np.zeros(3)\n    w += 1\n    w[0] = 5\n    u, s, vt = np.linalg.svd(np.eye(3))\n"
        "    random.seed(1)\n    d = {k: v for k, v in zip('ab', (1, 2))}\n"
        "    return [a.total, float(w.sum()), float(s.sum()), '{:.2f}'.format(math.pi), json.loads('[1]'), d, printed]\n"
    )
    res = sandbox.run({"main.py": src}, "main.py", {}, limits=Limits())
    assert res.status == "ok", res.error
    assert res.value == [8, 7.0, 3.0, "3.14", [1], {"a": 1, "b": 2}, ""]


# ---------------------------------------------------------------------------------------------------
# OS layers alone (RestrictedPython bypassed): raw Python in a child hardened exactly like a task child

BYPASS = r'''
def attempts(arena):
    import ctypes, os, socket, subprocess
    import numpy as np
    import MNN
    out = {}
    def attempt(name, fn):
        try:
            out[name] = "ALLOWED: " + repr(fn())[:80]
        except BaseException as exc:
            out[name] = "denied: " + type(exc).__name__ + ": " + str(exc)[:80]
    attempt("read_secret", lambda: open(arena["secret"]).read())
    attempt("np_fromfile_secret", lambda: np.fromfile(arena["secret"], dtype=np.uint8).tobytes())
    attempt("write_file", lambda: open(arena["watch"] + "/w.txt", "w").write("x"))
    attempt("np_save", lambda: np.save(arena["watch"] + "/a.npy", np.ones(2)))
    attempt("mnn_save", lambda: MNN.expr.save([MNN.expr.const([1.0], [1])], arena["watch"] + "/m.mnn"))
    def tcp():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.connect(("127.0.0.1", arena["port"]))
    attempt("tcp_connect", tcp)
    def abstract():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect("\0" + arena["abstract"])
    attempt("abstract_unix", abstract)
    def fork():
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        return pid
    attempt("fork", fork)
    attempt("subprocess", lambda: subprocess.run(["/bin/touch", arena["watch"] + "/exec"]).returncode)
    attempt("execv", lambda: os.execv("/bin/true", ["true"]))
    attempt("kill_host", lambda: os.kill(arena["host_pid"], 0))
    attempt("kill_group", lambda: os.kill(-1, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    def ptrace():
        if libc.ptrace(16, arena["host_pid"], None, None) != 0:  # PTRACE_ATTACH
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    attempt("ptrace_host", ptrace)
    def clone3():
        if libc.syscall(435, None, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    attempt("clone3", clone3)
    out["compute"] = float((np.ones((32, 32)) @ np.ones((32, 32))).sum())
    return out
'''


def _run_bypass(arena: dict, caps: dict, use: dict) -> dict:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked child
        code = 0
        try:
            os.close(r)
            import encodings.idna  # noqa: F401
            import subprocess  # noqa: F401
            import MNN  # noqa: F401  (imports need file access, so before the layers, as in the zygote)
            import numpy  # noqa: F401

            ns: dict = {}
            exec(BYPASS, ns)
            if caps["profile"] == "android_sim":
                seccomp.install(seccomp.build_android_sim_filter())
            layers = {"seccomp": caps["seccomp"] is True and use["seccomp"],
                      "landlock": caps["landlock"] if use["landlock"] else 0, "drop_uid": caps["drop_uid"],
                      "fs_mode": "none"}
            child.harden(w, {"memory_mb": 256, "cpu_seconds": 10}, layers)
            os.write(w, json.dumps(ns["attempts"](_event(arena))).encode())
        except BaseException as exc:
            os.write(w, json.dumps({"harness_error": repr(exc)}).encode())
            code = 1
        os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


LAYER_SETS = [("native", "all"), ("android_sim", "all"), ("native", "seccomp_only"), ("native", "landlock_only")]


@pytest.mark.parametrize("profile,layer_set", LAYER_SETS, ids=[f"{p}-{l}" for p, l in LAYER_SETS])
def test_os_layers_hold_without_restricted_python(arena, profile, layer_set):
    with Sandbox(profile=profile) as sb:
        caps = dict(sb.capabilities)
    use = {"seccomp": layer_set != "landlock_only", "landlock": layer_set != "seccomp_only"}
    if layer_set == "landlock_only":
        assert caps["landlock"] >= 6, "this machine has Landlock ABI 7 (sandbox-notes); the probe must find it"
    before = sorted(os.listdir(arena["watch"]))
    out = _run_bypass(arena, caps, use)
    assert "harness_error" not in out, out
    assert out.pop("compute") == 32.0 ** 3  # numpy still computes under every layer
    allowed = {k: v for k, v in out.items() if not v.startswith("denied")}
    # MNN's C++ F.save fails silently under the filter (returns None): the file check below covers it.
    # Landlock alone does not stop fork() (sandbox-notes section 3), and kill(-1, 0) then reaches that forked
    # child, which is inside the same Landlock domain; seccomp stops both.
    expected = {"mnn_save", "fork", "kill_group"} if layer_set == "landlock_only" else {"mnn_save"}
    assert set(allowed) <= expected, f"{profile}/{layer_set}: layers let through {allowed}"
    if layer_set != "landlock_only":
        assert all(("Errno 1]" in v or "Errno 38]" in v) for v in out.values() if v.startswith("denied")), out
    assert sorted(os.listdir(arena["watch"])) == before
    assert SECRET not in json.dumps(out)
    assert _no_connection(arena["tcp"]) and _no_connection(arena["unix"])
    os.kill(os.getpid(), 0)  # the host (this process) is alive and was not stopped
