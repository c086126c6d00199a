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


# -- a real PostgreSQL for the state suite (like the Redis server in tests/coda/conftest.py) ---------
def _pg_bindir() -> str:
    """The folder holding initdb and postgres: pg_config's, else Debian's newest, else PATH's."""
    import glob
    import shutil
    import subprocess
    found = []
    if shutil.which("pg_config"):
        found.append(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip())
    found += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    if shutil.which("initdb"):
        found.append(os.path.dirname(os.path.realpath(shutil.which("initdb"))))
    for d in found:
        if d and os.path.exists(os.path.join(d, "initdb")) and os.path.exists(os.path.join(d, "postgres")):
            return d
    pytest.fail("PostgreSQL is not installed; the state tests need a real one: apt-get install -y postgresql "
                "(or `make system-deps`)", pytrace=False)


@pytest.fixture(scope="session")
def postgres_url():
    """postgresql://walle@127.0.0.1:<port>/postgres of a throwaway cluster started for this session
    (initdb in a temp folder). PostgreSQL refuses to run as root, so as root it runs as `nobody`."""
    import shutil
    import signal
    import socket
    import subprocess
    import tempfile

    import psycopg
    bindir = _pg_bindir()
    workdir = tempfile.mkdtemp(prefix="walle-pg-")
    as_user = {}
    if os.geteuid() == 0:
        import pwd
        pw = pwd.getpwnam("nobody")
        os.chown(workdir, pw.pw_uid, pw.pw_gid)
        as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    data, log = os.path.join(workdir, "data"), os.path.join(workdir, "postgres.log")
    init = subprocess.run([os.path.join(bindir, "initdb"), "-D", data, "-U", "walle", "--auth=trust", "-E", "UTF8",
                           "--locale=C", "--no-sync"], cwd=workdir, capture_output=True, text=True, **as_user)
    if init.returncode != 0:
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.fail(f"initdb failed: {init.stderr[-1000:]}", pytrace=False)
    last_error = ""
    try:
        for _attempt in range(3):  # the free port can be taken between probing and binding
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            with open(log, "ab") as logf:
                proc = subprocess.Popen(
                    [os.path.join(bindir, "postgres"), "-D", data, "-h", "127.0.0.1", "-p", str(port), "-k", workdir,
                     "-F", "-c", "max_connections=400", "-c", "full_page_writes=off"],
                    cwd=workdir, stdout=logf, stderr=subprocess.STDOUT, **as_user)
            url = f"postgresql://walle@127.0.0.1:{port}/postgres"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    psycopg.connect(url, connect_timeout=2).close()
                    break
                except psycopg.OperationalError as e:
                    last_error = str(e)
                    time.sleep(0.1)
            else:
                with open(log, errors="replace") as f:
                    last_error += f.read()[-800:]
                proc.kill()
                proc.wait()
                continue
            try:
                yield url
            finally:
                proc.send_signal(signal.SIGINT)  # fast shutdown: disconnects clients
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            return
        pytest.fail(f"postgres did not start: {last_error}", pytrace=False)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def pg_state_url(postgres_url):
    """A state URL on the session's PostgreSQL, in a fresh schema (tests sharing the server stay apart)."""
    import uuid

    import psycopg
    schema = f"t{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return f"{postgres_url}?options=-csearch_path%3D{schema}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def state_url(request, tmp_path):
    """One state URL per implementation: a shared suite taking it runs against both."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.sqlite3'}"
    return request.getfixturevalue("pg_state_url")
