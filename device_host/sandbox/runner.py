"""Host side: the Sandbox API, a pool of zygotes, and the per-run conversation with a task child.

The host never runs task code and is never forked for a task. Per run it makes a socketpair, hands one
end to an idle zygote (SCM_RIGHTS), and talks framed JSON with the forked child directly: host API calls
are answered by `api_handler` here, in the host, on a per-run worker thread under the run's Budget: the
deadline and the CPU limit (the child's CPU plus the host's CPU for its ops) end the run even while an op is
executing, and the op is cancelled (walle.device_host.budget). At the end (result, error, deadline) the child's process
group always gets SIGKILL and the zygote reaps it and reports the wait status and peak RSS.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from walle.protos.errors import FailedPrecondition, InvalidArgument

from .. import budget as host_budget
from . import protocol

STATUSES = ("ok", "error", "timeout", "cpu_limit", "memory", "crashed", "killed", "protocol", "refused")
PROFILES = ("native", "android_sim")
_ZYGOTE_START_TIMEOUT_S = 60.0
_CONTROL_TIMEOUT_S = 30.0
_CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE, signal.SIGSYS,
                  signal.SIGTRAP}


@dataclass
class Limits:
    memory_mb: int = 256  # address space on top of the zygote's own VmSize
    cpu_seconds: float = 10  # RLIMIT_CPU, rounded up to whole seconds (SIGXCPU -> "cpu_limit")
    wall_seconds: float = 30  # host deadline; ends in killpg(SIGKILL) -> "timeout"

    def validate(self) -> None:
        if not isinstance(self.memory_mb, int) or not 16 <= self.memory_mb <= 64 * 1024:
            raise InvalidArgument(f"Limits.memory_mb must be an int in [16, 65536], got {self.memory_mb!r}")
        for name in ("cpu_seconds", "wall_seconds"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value <= 24 * 3600:
                raise InvalidArgument(f"Limits.{name} must be a number in (0, 86400], got {value!r}")


@dataclass
class RunResult:
    status: str
    value: object = None
    error: str = ""
    duration_s: float = 0.0
    peak_memory_kb: int = 0
    logs: list[str] = field(default_factory=list)
    host_cpu_s: float = 0.0  # CPU the host spent on this run's host API ops
    cpu_s: float = 0.0  # CPU of the task process itself


class _ZygoteDied(Exception):
    pass


class _Zygote:
    """One zygote process and its control socket. Used by one run at a time (the pool guarantees it)."""

    def __init__(self, profile: str, mnn: bool = True):
        self.profile = profile
        self.mnn = mnn
        self.runs = 0
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1",
               "OMP_NUM_THREADS": "1"}
        debug = os.environ.get("WALLE_SANDBOX_DEBUG") == "1"
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-m", "walle.device_host.sandbox.zygote", str(theirs.fileno()), profile]
                + ([] if self.mnn else ["no-mnn"]),
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=None if debug else subprocess.DEVNULL, start_new_session=True, close_fds=True)
        finally:
            theirs.close()
        self.ctrl = ours
        self.pid = self.proc.pid

    def wait_ready(self) -> None:
        reply = self._recv(_ZYGOTE_START_TIMEOUT_S)
        if "ready" not in reply:
            raise _ZygoteDied(f"zygote sent {reply!r} instead of ready")

    def request(self, msg: dict, fds: list[int] | None = None, timeout: float = _CONTROL_TIMEOUT_S) -> dict:
        try:
            if fds:
                socket.send_fds(self.ctrl, [json.dumps(msg).encode()], fds)
            else:
                self.ctrl.send(json.dumps(msg).encode())
        except OSError as exc:
            raise _ZygoteDied(f"zygote control socket: {exc}") from None
        return self._recv(timeout)

    def _recv(self, timeout: float) -> dict:
        self.ctrl.settimeout(timeout)
        try:
            data = self.ctrl.recv(65536)
        except (socket.timeout, OSError) as exc:
            raise _ZygoteDied(f"zygote did not answer: {exc}") from None
        if not data:
            raise _ZygoteDied(f"zygote exited (code {self.proc.poll()})")
        return json.loads(data)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        try:
            self.ctrl.close()  # EOF: the zygote kills its children and exits
        finally:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Sandbox:
    """Runs task bundles in fresh forks of 1..`workers` zygotes; `run` is thread-safe.

    profile "android_sim" traps landlock_*/seccomp()/close_range/unshare in the zygote (like an Android
    app's seccomp policy), so the layers a phone denies are off and the fallbacks are exercised.
    Untrusted tasks are refused unless seccomp or Landlock is effective, or allow_unconfined=True.
    mnn=False runs the zygote as on a device without an MNN wheel (Termux): `import MNN` fails clearly.
    """

    def __init__(self, *, profile: str = "native", allow_unconfined: bool = False, workers: int = 1,
                 restart_every: int = 500, mnn: bool = True):
        if profile not in PROFILES:
            raise InvalidArgument(f"profile must be one of {PROFILES}, got {profile!r}")
        if not isinstance(workers, int) or not 1 <= workers <= 64:
            raise InvalidArgument(f"workers must be an int in [1, 64], got {workers!r}")
        if not isinstance(restart_every, int) or restart_every < 1:
            raise InvalidArgument(f"restart_every must be a positive int, got {restart_every!r}")
        self.profile, self.allow_unconfined, self.restart_every = profile, allow_unconfined, restart_every
        self.mnn = mnn
        self._idle: queue.LifoQueue[_Zygote] = queue.LifoQueue()
        self._all: set[_Zygote] = set()
        self._lock = threading.Lock()
        self._closed = False
        zygotes = [_Zygote(profile, mnn) for _ in range(workers)]
        try:
            for z in zygotes:
                z.wait_ready()
            caps = zygotes[0].request({"op": "probe"}, timeout=_ZYGOTE_START_TIMEOUT_S)["capabilities"]
        except BaseException:
            for z in zygotes:
                z.close()
            raise
        caps["confined"] = bool(caps.get("seccomp") is True or (caps.get("landlock") or 0) > 0)
        caps["allow_unconfined"] = allow_unconfined
        self.capabilities: dict = caps
        self._layers = {"seccomp": caps.get("seccomp") is True, "landlock": int(caps.get("landlock") or 0),
                        "drop_uid": caps.get("drop_uid") is True, "fs_mode": caps.get("fs_mode", "none")}
        for z in zygotes:
            self._all.add(z)
            self._idle.put(z)

    # -- pool ---------------------------------------------------------------------------------------
    def _acquire(self) -> _Zygote:
        while True:
            if self._closed:
                raise FailedPrecondition("the sandbox is closed")
            try:
                z = self._idle.get(timeout=0.5)
            except queue.Empty:
                continue
            if self._closed:
                self._idle.put(z)
                raise FailedPrecondition("the sandbox is closed")
            return z

    def _release(self, z: _Zygote) -> None:
        if not self._closed and (not z.alive() or z.runs >= self.restart_every):
            try:
                z = self._replace(z)
            except Exception:
                pass  # keep the dead one in the pool: the next run retries the restart
        self._idle.put(z)

    def _replace(self, old: _Zygote) -> _Zygote:
        with self._lock:
            self._all.discard(old)
        old.close()
        new = _Zygote(self.profile, self.mnn)
        new.wait_ready()
        with self._lock:
            self._all.add(new)
        return new

    # -- running ------------------------------------------------------------------------------------
    def run(self, files: dict[str, str], entry: str, event: dict, *, limits: Limits | None = None,
            api_handler: Callable[[str, list, dict], object] | None = None,
            allowed_apis: set[str] | frozenset[str] = frozenset()) -> RunResult:
        """Run `entry`'s `main(event)` from the bundle `files` in a fresh sandboxed child."""
        limits = limits or Limits()
        limits.validate()
        _check_bundle(files, entry)
        if not self.capabilities["confined"] and not self.allow_unconfined:
            return RunResult("refused", error=(
                "neither seccomp nor Landlock is effective on this platform; untrusted tasks are refused "
                "(operators may pass allow_unconfined=True / --allow-unconfined-tasks to run them with only "
                f"rlimits and RestrictedPython); capabilities: {self.capabilities}"))
        try:
            task = protocol.encode({"files": files, "entry": entry, "event": event,
                                    "allowed_apis": sorted(allowed_apis)})
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"event is not JSON: {exc}") from None
        if len(task) > protocol.MAX_MESSAGE:
            raise InvalidArgument(f"task bundle + event is {len(task)} bytes, over the {protocol.MAX_MESSAGE}-byte cap")
        try:
            protocol.check_expansion(task)  # the child would refuse it
        except protocol.ProtocolError as exc:
            raise InvalidArgument(f"task bundle + event: {exc}") from None
        z = self._acquire()
        try:
            for attempt in (1, 2):
                try:
                    return self._run_once(z, task, limits, api_handler, frozenset(allowed_apis))
                except _ZygoteDied as exc:
                    if attempt == 2 or getattr(exc, "started", False):
                        return RunResult("crashed", error=f"sandbox worker died: {exc}")
                    z = self._replace(z)
        finally:
            self._release(z)
        raise AssertionError("unreachable")

    def _run_once(self, z: _Zygote, task: bytes, limits: Limits, api_handler, allowed: frozenset) -> RunResult:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        started = time.monotonic()
        deadline = started + limits.wall_seconds
        pid, reaped = None, None
        try:
            try:
                reply = z.request({"op": "run", "limits": {"memory_mb": limits.memory_mb,
                                                           "cpu_seconds": limits.cpu_seconds},
                                   "layers": self._layers}, fds=[theirs.fileno()])
            finally:
                theirs.close()
            if "pid" not in reply:
                raise _ZygoteDied(f"zygote could not start the task: {reply.get('error', reply)}")
            z.runs += 1
            pid = int(reply["pid"])
            run_budget = host_budget.Budget(deadline, limits.cpu_seconds, limits.memory_mb << 20, pid)
            outcome = _Conversation(protocol.Channel(ours), run_budget, api_handler, allowed).run(task)
            if outcome.timed_out or outcome.kind == "host_cpu":
                _killpg(pid)  # the zombie holds the pgid until the zygote reaps it: no pid reuse race
            duration = time.monotonic() - started
            reaped = self._reap(z, pid)
        finally:
            ours.close()
            if pid is not None and reaped is None:  # the handler raised: still never leave the child behind
                _killpg(pid)
                try:
                    self._reap(z, pid)
                except _ZygoteDied:
                    pass
        res = _classify(outcome, reaped, limits, duration)
        res.host_cpu_s = run_budget.host_cpu_s
        return res

    @staticmethod
    def _reap(z: _Zygote, pid: int) -> dict:
        try:
            return z.request({"op": "reap", "pid": pid})
        except _ZygoteDied as exc:
            exc.started = True  # type: ignore[attr-defined]  (the task ran: do not run it twice)
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            zygotes = list(self._all)
            self._all.clear()
        for z in zygotes:
            z.close()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _check_bundle(files: object, entry: object) -> None:
    if not isinstance(files, dict) or not files:
        raise InvalidArgument("files must be a non-empty dict of relative path -> source text")
    for path, source in files.items():
        if not isinstance(path, str) or not path.endswith(".py") or path.startswith("/") or ".." in path.split("/"):
            raise InvalidArgument(f"bundle path {path!r} must be a relative .py path without '..'")
        if not isinstance(source, str):
            raise InvalidArgument(f"bundle file {path!r} must be source text, got {type(source).__name__}")
    if entry not in files:
        raise InvalidArgument(f"entry {entry!r} is not in the bundle (files: {', '.join(sorted(files))})")


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class _Outcome:
    def __init__(self) -> None:
        self.kind = "eof"  # "result" | "error" | "fatal" | "protocol" | "eof"
        self.value: object = None
        self.detail = ""
        self.error_type = ""
        self.timed_out = False
        self.logs: list[str] = []


class _Overrun(Exception):
    """The run's budget ran out while a host op was executing ("timeout" or "cpu")."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


class _OpWorker:
    """Runs one run's host API ops on a daemon thread with the run's Budget bound, while the calling
    thread watches the deadline and the CPU spent (child + host) and gives up on an op that overruns."""

    POLL_S = 0.05

    def __init__(self, run_budget: host_budget.Budget, owner: str):
        self.budget, self.owner = run_budget, owner
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="walle-host-op", daemon=True)
        self._thread.start()
        self._clock = time.pthread_getcpuclockid(self._thread.ident)

    def _loop(self) -> None:
        host_budget.bind(self.budget)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, done, box = job
            t0 = time.thread_time()
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed to the caller
                box["error"] = exc
            box["cpu"] = time.thread_time() - t0
            done.set()

    def call(self, fn: Callable[[], object]) -> object:
        """fn()'s value or exception; _Overrun when the run's wall or CPU budget runs out first."""
        host_budget.admit_new_op(self.owner)
        done, box = threading.Event(), {}
        start = time.clock_gettime(self._clock)
        self._jobs.put((fn, done, box))
        while not done.wait(max(0.0, min(self.POLL_S, self.budget.wall_left()))):
            if self.budget.wall_left() <= 0:
                self._abandon("wall-clock limit reached")
                raise _Overrun("timeout")
            if self.budget.cpu_left(time.clock_gettime(self._clock) - start) <= 0:
                self._abandon("CPU limit reached")
                raise _Overrun("cpu")
        self.budget.charge(box["cpu"])
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _abandon(self, reason: str) -> None:
        self.budget.cancel(reason)
        host_budget.linger(self.owner, self._thread)

    def close(self) -> None:
        self._jobs.put(None)  # an abandoned op finishes (cancelled) on its own, then the thread ends


class _Conversation:
    """Reads the child's messages until its result, answering host API calls on the way."""

    def __init__(self, channel: protocol.Channel, run_budget: host_budget.Budget, api_handler, allowed: frozenset):
        self.channel, self.budget, self.api_handler, self.allowed = channel, run_budget, api_handler, allowed
        self.deadline = run_budget.deadline
        self.out = _Outcome()
        self.log_chars = 0
        self.ops: _OpWorker | None = None

    def run(self, task: bytes) -> _Outcome:
        try:
            out = self._converse(task)
            if self.budget.cpu_exceeded and not out.timed_out:
                out.kind = "host_cpu"  # the budget's watcher killed the child
            return out
        finally:
            self.budget.cancel("the run ended")  # an op still executing stops at its next check
            if self.ops is not None:
                self.ops.close()

    def _converse(self, task: bytes) -> _Outcome:
        out = self.out
        try:
            self.channel.send_bytes(task, self.deadline)
            while True:
                msg = self.channel.recv(self.deadline)
                if isinstance(msg, dict) and "call" in msg:
                    self._answer(msg)
                    continue
                if not isinstance(msg, dict) or len(msg) != 1:
                    raise protocol.ProtocolError(f"unexpected message from the child: {str(msg)[:200]}")
                (kind, body), = msg.items()
                if kind == "log":
                    self._log(body)
                elif kind == "result":
                    out.kind, out.value = "result", body
                    return out
                elif kind == "error" and isinstance(body, dict):
                    out.kind, out.error_type = "error", str(body.get("type", "Error"))
                    out.detail = f"{out.error_type}: {body.get('message', '')}"
                    if body.get("traceback"):  # the task's own frames, under the error line
                        out.detail += "\nTraceback (most recent call last):\n" + str(body["traceback"])
                    return out
                elif kind == "fatal":
                    out.kind, out.detail = "fatal", str(body)
                    return out
                else:
                    raise protocol.ProtocolError(f"unknown message kind {kind!r} from the child")
        except protocol.DeadlineExceeded:
            out.timed_out = True
        except _Overrun as exc:
            if exc.kind == "timeout":
                out.timed_out = True
            else:
                out.kind = "host_cpu"
        except protocol.ProtocolError as exc:
            out.kind, out.detail = "protocol", str(exc)
        except protocol.PeerClosed as exc:
            out.kind, out.detail = "eof", str(exc)
        except Exception as exc:  # a host bug must still end in this run's failure, never escape the run
            out.kind, out.detail = "host", f"{type(exc).__name__}: {exc}"
        return out

    def _answer(self, msg: dict) -> None:
        op, args, kwargs = msg.get("call"), msg.get("args", []), msg.get("kwargs", {})
        if set(msg) - {"call", "args", "kwargs"} or not isinstance(op, str) or not isinstance(args, list) \
                or not isinstance(kwargs, dict):
            raise protocol.ProtocolError(f"malformed host API call: {str(msg)[:200]}")
        if op not in self.allowed:
            reply = _api_error("PermissionDenied", f"{op!r} is not an allowed API for this task")
        elif self.api_handler is None:
            reply = _api_error("Unavailable", f"no host API handler is attached, so {op!r} cannot run")
        else:
            if self.ops is None:  # ops are charged to the task the handler serves (HostAPI.task)
                self.ops = _OpWorker(self.budget, str(getattr(self.api_handler, "task", "") or id(self.api_handler)))
            handler = self.api_handler
            try:
                value = self.ops.call(lambda: handler(op, args, kwargs))
            except _Overrun:
                raise
            except Exception as exc:  # the handler's error goes back to the task, never up into the host
                reply = _api_error(type(exc).__name__, str(exc))
            else:
                try:
                    reply = protocol.encode({"ok": value})
                except (TypeError, ValueError) as exc:
                    reply = _api_error("TypeError", f"result of {op!r} is not JSON: {exc}")
            if len(reply) > protocol.MAX_MESSAGE:
                reply = _api_error("ResourceExhausted", f"result of {op!r} is over the {protocol.MAX_MESSAGE}-byte cap")
            else:
                try:  # the child would refuse it: tell the task why instead
                    protocol.check_expansion(reply)
                except protocol.ProtocolError as exc:
                    reply = _api_error("ResourceExhausted", f"result of {op!r}: {exc}")
        self.channel.send_bytes(reply, self.deadline)

    def _log(self, line: object) -> None:
        line = str(line)
        if self.log_chars < protocol.MAX_LOGS:
            self.log_chars += len(line) + 1
            self.out.logs.append(line[: protocol.MAX_LOGS])


def _api_error(kind: str, message: str) -> bytes:
    return protocol.encode({"error": {"type": kind, "message": message[:4096]}})


def _classify(out: _Outcome, reaped: dict, limits: Limits, duration: float) -> RunResult:
    status_raw = int(reaped.get("status", 0))
    res = RunResult("crashed", duration_s=duration, peak_memory_kb=int(reaped.get("maxrss_kb", 0)), logs=out.logs,
                    cpu_s=float(reaped.get("cpu_s", 0)))
    if out.timed_out:
        res.status, res.error = "timeout", f"wall-clock limit of {limits.wall_seconds} s exceeded; killed"
    elif out.kind == "host_cpu":
        res.status, res.error = "cpu_limit", (f"CPU limit of {limits.cpu_seconds} s exceeded by the task and the "
                                              f"host work it asked for; killed")
    elif out.kind == "host":
        res.status, res.error = "crashed", f"the host failed while serving the task: {out.detail}"
    elif out.kind == "result":
        res.status, res.value = "ok", out.value
    elif out.kind == "error":
        res.status = "memory" if out.error_type == "MemoryError" else "error"
        res.error = out.detail
    elif out.kind == "fatal":
        res.status, res.error = "refused", out.detail
    elif out.kind == "protocol":
        res.status, res.error = "protocol", f"protocol violation: {out.detail}; child killed"
    elif os.WIFSIGNALED(status_raw):
        sig = os.WTERMSIG(status_raw)
        name = signal.Signals(sig).name
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and float(reaped.get("cpu_s", 0)) >= limits.cpu_seconds):
            res.status, res.error = "cpu_limit", f"CPU limit of {limits.cpu_seconds} s exceeded ({name})"
        elif sig in _CRASH_SIGNALS:
            res.status, res.error = "crashed", f"task process died with {name}"
        else:
            res.status, res.error = "killed", f"task process was killed by {name}"
    else:
        code = os.WEXITSTATUS(status_raw)
        res.status, res.error = ("crashed" if code else "protocol"), f"task process exited ({code}) without a result"
    return res
