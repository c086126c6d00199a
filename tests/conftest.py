"""Suite-wide guards: the suite must exit by itself.

- `serve` starts platform servers for a test and always stops them, pass or fail.
- After every test, a server the test started and left running is stopped and the test errors,
  naming it: a leak is reported where it happens, not as a hang at exit.
- At the end of the session, a server still running, a non-daemon thread or a pool thread still
  busy in a task (the interpreter joins those at exit) fails the run loudly with the thread's
  stack, and the process exits anyway instead of hanging."""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback

import pytest

from walle.platform.server import build_server, running_servers

_final = {"status": 0, "lingering": []}


@pytest.fixture
def serve():
    """`_server, port, stop = serve(platform, **build_server_kwargs)`; stopped at teardown."""
    stops = []

    def start(platform, **kwargs):
        server, port, stop = build_server(platform, **kwargs)
        stops.append(stop)
        return server, port, stop
    yield start
    for stop in reversed(stops):
        stop(0)  # stop is idempotent: a test may have stopped it already


@pytest.fixture(autouse=True)
def _no_server_left_behind(request):
    # Autouse function fixtures are set up after wider-scoped fixtures, so servers a module or
    # session fixture started are already in `before` and are not blamed on this test.
    before = {id(s) for s in running_servers()}
    yield
    left = [s for s in running_servers() if id(s) not in before]
    for s in left:
        s.stop(0)
    if left:
        pytest.fail(f"{request.node.nodeid} left {len(left)} server(s) running "
                    f"({', '.join(s.address for s in left)}): stop them in teardown "
                    f"(the `serve` fixture, or try/finally around stop())", pytrace=False)


def _busy_pool_thread(t: threading.Thread) -> bool:
    """A concurrent.futures worker in the middle of a task (an idle one ends at exit by itself)."""
    frame = sys._current_frames().get(t.ident)
    while frame is not None:
        if frame.f_code.co_name == "run" and frame.f_code.co_filename.endswith(os.path.join("futures", "thread.py")):
            return True
        frame = frame.f_back
    return False


def lingering_threads() -> list[threading.Thread]:
    """Threads the interpreter would wait for at exit."""
    from concurrent.futures import thread as cf_thread
    pool_threads = set(cf_thread._threads_queues)
    out = []
    for t in threading.enumerate():
        if t is threading.main_thread() or not t.is_alive():
            continue
        if t in pool_threads:
            if _busy_pool_thread(t):
                out.append(t)
        elif not t.daemon:
            out.append(t)
    return out


def _describe(t: threading.Thread) -> str:
    frame = sys._current_frames().get(t.ident)
    stack = "".join(traceback.format_stack(frame)[-6:]) if frame else "  (no stack)\n"
    return f"thread {t.name!r} (daemon={t.daemon}):\n{stack}"


def pytest_sessionfinish(session, exitstatus):
    problems = []
    for s in running_servers():
        problems.append(f"a server on {s.address} was still running at the end of the session")
        s.stop(0)
    deadline = time.monotonic() + 10  # threads that are finishing get a moment
    threads = lingering_threads()
    while threads and time.monotonic() < deadline:
        time.sleep(0.1)
        threads = lingering_threads()
    problems += [_describe(t) for t in threads]
    _final["lingering"] = threads
    if problems:
        text = ("\nSUITE TEARDOWN: left behind at the end of the session (the interpreter would hang at exit):\n"
                + "\n".join(problems))
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(text, red=True, bold=True)
        else:
            print(text, file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    _final["status"] = int(session.exitstatus)


def pytest_unconfigure(config):
    if any(t.is_alive() for t in _final["lingering"]):
        # Reported above; exit now rather than wait at interpreter exit for a thread that never ends.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_final["status"] or 1)
