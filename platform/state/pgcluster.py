"""A throwaway PostgreSQL cluster in a temp folder (initdb + postgres on 127.0.0.1), for the test
suite and the benchmarks: the real server, private to one run, gone afterwards."""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

from ..errors import FailedPrecondition, Unavailable


def bindir() -> str:
    """The folder holding initdb and postgres: pg_config's, else Debian's newest, else PATH's."""
    found = []
    if shutil.which("pg_config"):
        found.append(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip())
    found += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    if shutil.which("initdb"):
        found.append(os.path.dirname(os.path.realpath(shutil.which("initdb"))))
    for d in found:
        if d and os.path.exists(os.path.join(d, "initdb")) and os.path.exists(os.path.join(d, "postgres")):
            return d
    raise FailedPrecondition("PostgreSQL is not installed (no initdb/postgres found): apt-get install -y postgresql")


@contextmanager
def throwaway_cluster(timeout: float = 30) -> Iterator[str]:
    """Yields postgresql://walle@127.0.0.1:<port>/postgres. PostgreSQL refuses to run as root, so
    as root the server runs as `nobody` (its folder is handed to that user)."""
    import psycopg
    bins = bindir()
    workdir = tempfile.mkdtemp(prefix="walle-pg-")
    as_user: dict = {}
    if os.geteuid() == 0:
        import pwd
        pw = pwd.getpwnam("nobody")
        os.chown(workdir, pw.pw_uid, pw.pw_gid)
        as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    data, log = os.path.join(workdir, "data"), os.path.join(workdir, "postgres.log")
    try:
        init = subprocess.run([os.path.join(bins, "initdb"), "-D", data, "-U", "walle", "--auth=trust", "-E", "UTF8",
                               "--locale=C", "--no-sync"], cwd=workdir, capture_output=True, text=True, **as_user)
        if init.returncode != 0:
            raise Unavailable(f"initdb failed: {init.stderr[-1000:]}")
        last_error = ""
        for _attempt in range(3):  # the free port can be taken between probing and binding
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            with open(log, "ab") as logf:
                # -F: no fsync (a throwaway cluster); enough connections for many servers' threads
                proc = subprocess.Popen(
                    [os.path.join(bins, "postgres"), "-D", data, "-h", "127.0.0.1", "-p", str(port), "-k", workdir,
                     "-F", "-c", "max_connections=400", "-c", "full_page_writes=off"],
                    cwd=workdir, stdout=logf, stderr=subprocess.STDOUT, **as_user)
            url = f"postgresql://walle@127.0.0.1:{port}/postgres"
            deadline = time.monotonic() + timeout
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
        raise Unavailable(f"postgres did not start: {last_error}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def fresh_schema(url: str) -> str:
    """A state URL on the same server in a new, empty schema (callers sharing a server stay apart)."""
    import uuid

    import psycopg
    schema = f"t{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
