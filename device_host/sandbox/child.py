"""What runs inside a freshly forked task child: apply the OS layers, then run the task under the policy.

Order (all before any task byte is read): own process group, PDEATHSIG, close every inherited fd but the
task socket (by listing /proc/self/fd: close_range may be trapped on Android), rlimits (AS = current
VmSize + budget, CPU, NOFILE, FSIZE 0 with SIGXFSZ ignored, CORE 0), drop root to nobody, Landlock,
seccomp. Then: receive the task, restricted-compile the bundle, call ``main(event)``, send the result.
"""
from __future__ import annotations

import gc
import linecache
import os
import resource
import signal
import socket
import sys
import traceback

from . import landlock, policy, protocol, seccomp
from .policy import Namespace

API_GROUPS = ("storage", "model", "tunnel", "events", "log", "config")
LIB_DIR = "_lib"  # where a bundle holds its task libraries (walle.platform.manifest.LIB_DIR)
NOBODY = 65534
_PR_SET_PDEATHSIG = 1


class HostAPIError(Exception):
    """A host API call failed (refused in the child, or the host answered with an error)."""

    def __init__(self, op: str, kind: str, message: str):
        super().__init__(f"host API {op} failed: {kind}: {message}")
        self.op, self.kind, self.detail = op, kind, message


class HostClient:
    """The child's side of host API calls: one request, one reply, over the task channel."""

    def __init__(self, channel: protocol.Channel, allowed: frozenset[str]):
        self.channel, self.allowed = channel, allowed

    def call(self, op: str, args: tuple, kwargs: dict) -> object:
        if op not in self.allowed:
            allowed = ", ".join(sorted(self.allowed)) or "none"
            raise HostAPIError(op, "PermissionDenied", f"{op!r} is not an allowed API for this task (allowed: {allowed})")
        self.channel.send({"call": op, "args": list(args), "kwargs": dict(kwargs)})
        reply = self.channel.recv()
        if isinstance(reply, dict) and "ok" in reply:
            return reply["ok"]
        err = reply.get("error") if isinstance(reply, dict) else None
        if isinstance(err, dict):
            raise HostAPIError(op, str(err.get("type", "Error")), str(err.get("message", "")))
        raise HostAPIError(op, "ProtocolError", "malformed reply from the host")


class HostFunction:
    __slots__ = ("_op", "_client")

    def __init__(self, op: str, client: HostClient):
        self._op, self._client = op, client

    def __call__(self, *args, **kwargs):
        return self._client.call(self._op, args, kwargs)

    def __repr__(self) -> str:
        return f"<host API {self._op}>"


class ApiGroup:
    """`storage`, `model`, ...: any public attribute is a proxy for the op `<group>.<name>`."""

    __slots__ = ("_group", "_client")

    def __init__(self, group: str, client: HostClient):
        object.__setattr__(self, "_group", group)
        object.__setattr__(self, "_client", client)

    def __getattr__(self, name: str) -> HostFunction:
        if name.startswith("_"):
            raise AttributeError(name)
        return HostFunction(f"{self._group}.{name}", self._client)

    def __setattr__(self, name, value):
        raise TypeError("host API groups are read-only")

    def __repr__(self) -> str:
        return f"<host API group {self._group}>"


policy._NO_WRITE_EXTRA.extend((HostFunction, ApiGroup, HostClient))


class LogSink:
    """Streams print output to the host line by line, capped at protocol.MAX_LOGS characters."""

    def __init__(self, channel: protocol.Channel):
        self.channel, self.pending, self.used, self.full = channel, "", 0, False

    def write(self, text: str) -> None:
        if self.full:
            return
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            self._emit(line)

    def flush(self) -> None:
        if self.pending and not self.full:
            line, self.pending = self.pending, ""
            self._emit(line)

    def _emit(self, line: str) -> None:
        if self.used + len(line) > protocol.MAX_LOGS:
            self.full, self.pending = True, ""
            self.channel.send({"log": f"[logs truncated at {protocol.MAX_LOGS} characters]"})
            return
        self.used += len(line) + 1
        self.channel.send({"log": line})


class _Printer:
    """What RestrictedPython's `print(...)` calls (`_print._call_print`); `printed` returns this scope's text."""

    def __init__(self, sink: LogSink):
        self.sink, self.text = sink, []

    def __call__(self) -> str:
        return "".join(self.text)

    def _call_print(self, *objects, sep=" ", end="\n", file=None, flush=False):  # noqa: ARG002
        if file is not None:
            raise TypeError("print(file=...) is not allowed in the sandbox")
        text = (" " if sep is None else str(sep)).join(str(o) for o in objects) + ("\n" if end is None else str(end))
        self.text.append(text)
        self.sink.write(text)


class TaskRuntime:
    """Per-run import hook and globals: curated modules, the `walle` API namespace, bundle modules."""

    def __init__(self, files: dict[str, str], client: HostClient, sink: LogSink):
        self.files = files
        groups = set(API_GROUPS) | {op.split(".", 1)[0] for op in client.allowed}
        walle = {g: ApiGroup(g, client) for g in sorted(groups)}
        walle["HostAPIError"] = HostAPIError
        self.modules: dict[str, object] = dict(policy.MODULES, walle=Namespace("walle", walle))
        self.bundle: dict[str, Namespace] = {}
        self.libraries = {p.split("/")[1] for p in files if p.startswith(LIB_DIR + "/") and p.count("/") >= 2}
        self.builtins = dict(policy.BASE_BUILTINS, __import__=self.import_, HostAPIError=HostAPIError)
        self.print_factory = lambda _getattr=None: _Printer(sink)
        for path, source in files.items():  # tracebacks can show guest lines without opening files
            linecache.cache[path] = (len(source), None, source.splitlines(True), path)

    def globals_for(self, modname: str, path: str) -> dict:
        g = dict(policy.BASE_GLOBALS)
        package = modname if path.endswith("/__init__.py") else modname.rpartition(".")[0]
        g.update(__builtins__=self.builtins, __name__=modname, __file__=path, __package__=package,
                 _print_=self.print_factory)
        return g

    def load_file(self, modname: str, path: str) -> dict:
        code = policy.compile_task(self.files[path], path)
        g = self.globals_for(modname, path)
        self.bundle[modname] = Namespace(modname, g)  # registered first, so circular imports see it
        exec(code, g)
        return g

    def _bundle_module(self, dotted: str) -> Namespace | None:
        if dotted in self.bundle:
            return self.bundle[dotted]
        head = dotted.split(".")[0]
        if head == LIB_DIR:
            return None  # libraries are imported by their own name, never through _lib
        base = dotted.replace(".", "/")
        if head in self.libraries:  # a task library: bundled at _lib/<name>/ (the manifest check forbids clashes)
            base = f"{LIB_DIR}/{base}"
        for path in (f"{base}.py", f"{base}/__init__.py"):
            if path in self.files:
                self.load_file(dotted, path)
                parent, _, leaf = dotted.rpartition(".")
                if parent and parent in self.bundle:
                    self.bundle[parent]._ns_attrs.setdefault(leaf, self.bundle[dotted])
                return self.bundle[dotted]
        return None

    def _resolve(self, dotted: str) -> object:
        head, *rest = dotted.split(".")
        if head in self.modules:
            obj = self.modules[head]
            for part in rest:
                obj = getattr(obj, part, None) if isinstance(obj, Namespace) else None
                if not isinstance(obj, Namespace):
                    raise ImportError(f"module {dotted!r} is not available in the sandbox")
            return obj
        obj = None
        for i in range(1, len(rest) + 2):
            obj = self._bundle_module(".".join([head, *rest][:i]))
            if obj is None:
                if head == "MNN":
                    raise ImportError("MNN is not installed on this device: tasks that train or run models "
                                      "cannot run here")
                raise ImportError(
                    f"module {dotted!r} is not available in the sandbox (allowed: numpy, math, json, random, "
                    f"MNN, walle, the task bundle's own .py files and its libraries)")
        return obj

    def import_(self, name, globals=None, locals=None, fromlist=None, level=0):  # noqa: A002
        if isinstance(fromlist, list):
            # numpy's C code imports its own submodules through the calling frame's __import__ with a list
            # fromlist; guest IMPORT_NAME always passes None or a tuple. Those modules are preloaded.
            return __import__(name, globals, locals, fromlist, level)
        if level:  # `from . import x` / `from .x import y` inside a package (a library, a task sub-folder)
            package = (globals or {}).get("__package__") or ""
            parts = package.split(".") if package else []
            if level > len(parts):
                raise ImportError("relative imports work only inside a package (a library, a task sub-folder); "
                                  "use `import helpers`")
            base = ".".join(parts[:len(parts) - level + 1])
            name = f"{base}.{name}" if name else base
        target = self._resolve(name)
        if not fromlist:
            return self._resolve(name.split(".")[0])
        for item in fromlist:
            if item == "*":
                raise ImportError("`import *` is not allowed in tasks")
            if getattr(target, item, None) is None and self._bundle_module(f"{name}.{item}") is None:
                raise ImportError(f"cannot import name {item!r} from {name!r} in the sandbox")
        return target

    def run_entry(self, entry: str, event: object) -> object:
        if entry not in self.files:
            raise FileNotFoundError(f"entry script {entry!r} is not in the bundle ({', '.join(sorted(self.files))})")
        modname = entry[:-3].replace("/", ".") if entry.endswith(".py") else entry.replace("/", ".")
        g = self.load_file(modname, entry)
        main = g.get("main")
        if not callable(main):
            raise NameError(f"{entry} does not define main(event)")
        return main(event)


# ---------------------------------------------------------------------------------------------------
# Process hardening

def _close_inherited_fds(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def vm_size_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def apply_rlimits(memory_mb: int, cpu_seconds: float, nofile: int = 32) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # FSIZE=0 then raises EFBIG instead of killing
    address_space = vm_size_bytes() + memory_mb * 1024 * 1024
    cpu = max(1, int(-(-cpu_seconds // 1)))
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def drop_root() -> bool:
    if os.getuid() != 0:
        return False
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)
    return True


def harden(task_fd: int, limits: dict, layers: dict) -> None:
    os.setpgid(0, 0)
    seccomp.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    _close_inherited_fds({0, 1, 2, task_fd})
    apply_rlimits(int(limits["memory_mb"]), float(limits["cpu_seconds"]))
    if layers.get("drop_uid"):
        drop_root()
    if layers.get("landlock"):
        landlock.restrict_self(int(layers["landlock"]))
    if layers.get("seccomp"):
        seccomp.install(seccomp.task_filter_bytes(layers.get("fs_mode", "none"), os.getpid()))


def _guest_traceback(exc: BaseException, files: dict) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename in files]
    return "".join(traceback.format_list(frames)).rstrip()


def main(task_fd: int, request: dict) -> None:
    """Entry point in the forked child. Never returns: always ends in os._exit."""
    code = 0
    sock = None
    try:
        try:
            harden(task_fd, request["limits"], request["layers"])
        except BaseException as exc:  # could not confine: say so, run nothing
            socket.socket(fileno=task_fd).sendall(protocol.frame(protocol.encode(
                {"fatal": f"sandbox setup failed: {type(exc).__name__}: {exc}"})))
            os._exit(3)
        sock = socket.socket(fileno=task_fd)
        channel = protocol.Channel(sock)
        reserve = bytearray(1 << 20)  # freed on MemoryError so the error report itself fits
        task = channel.recv()
        files, entry, event = task["files"], task["entry"], task["event"]
        client = HostClient(channel, frozenset(task.get("allowed_apis", ())))
        sink = LogSink(channel)
        try:
            runtime = TaskRuntime(files, client, sink)
            value = runtime.run_entry(entry, event)
            try:
                payload = protocol.encode({"result": value})
            except (TypeError, ValueError) as exc:
                raise TypeError(f"main() result is not JSON: {exc}") from None
            sink.flush()
            channel.send_bytes(payload)
        except MemoryError as exc:
            del reserve
            message = str(exc)
            del exc
            gc.collect()
            sink.flush()
            channel.send({"error": {"type": "MemoryError", "message": message or "out of memory", "traceback": ""}})
        except BaseException as exc:  # report everything, including KeyboardInterrupt-like escapes
            tb = _guest_traceback(exc, files)
            sink.flush()
            channel.send({"error": {"type": type(exc).__name__, "message": str(exc)[:4096], "traceback": tb}})
    except protocol.PeerClosed:
        code = 4
    except BaseException:
        code = 5
        try:
            traceback.print_exc(file=sys.stderr)
        except BaseException:
            pass
    finally:
        os._exit(code)
