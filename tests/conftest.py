"""Suite-wide guards: the suite must exit by itself.

- `serve` starts platform servers for a test and always stops them, pass or fail.
- After every test, a server the test started and left running is stopped and the test errors,
  naming it: a leak is reported where it happens, not as a hang at exit.
- At the end of the session, a server still running, a non-daemon thread or a pool thread still
  busy in a task (the interpreter joins those at exit) fails the run loudly with the thread's
  stack, and the process exits anyway instead of hanging."""
from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
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



# -- a real PostgreSQL for the state suite (like the Redis server in tests/coda/conftest.py) ---------
@pytest.fixture(scope="session")
def postgres_url():
    """postgresql://walle@127.0.0.1:<port>/postgres of a throwaway cluster started for this session
    (initdb in a temp folder; as root the server runs as `nobody`, since PostgreSQL refuses root)."""
    from walle.platform.errors import WalleError
    from walle.platform.state.pgcluster import throwaway_cluster
    try:
        cluster = throwaway_cluster()
        url = cluster.__enter__()
    except WalleError as e:
        pytest.fail(f"{e.message} (the state tests need a real PostgreSQL; `make system-deps`)", pytrace=False)
    try:
        yield url
    finally:
        cluster.__exit__(None, None, None)


@pytest.fixture
def pg_state_url(postgres_url):
    """A state URL on the session's PostgreSQL, in a fresh schema (tests sharing the server stay apart)."""
    from walle.platform.state.pgcluster import fresh_schema
    return fresh_schema(postgres_url)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def state_url(request, tmp_path):
    """One state URL per implementation: a shared suite taking it runs against both."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.sqlite3'}"
    return request.getfixturevalue("pg_state_url")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    """redis://127.0.0.1:<port>/0 of a private redis-server started for this session."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; the store tests need a real one: "
                    "apt-get install -y redis-server (or `make system-deps`)", pytrace=False)
    workdir: pathlib.Path = tmp_path_factory.mktemp("redis")
    last_error = ""
    for _attempt in range(3):  # the free port can be taken between probing and binding
        port = _free_port()
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir), "--logfile", str(workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            last_error = (proc.stderr.read().decode(errors="replace") if proc.poll() is not None else "no PING reply")
            log = workdir / "redis.log"
            last_error += log.read_text(errors="replace")[-500:] if log.exists() else ""
            proc.kill()
            proc.wait()
            continue
        client.close()
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return
    pytest.fail(f"redis-server did not start: {last_error}", pytrace=False)
