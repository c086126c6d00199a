"""kill -9 a real device host process during installs, again and again, then check what it left.

A platform (real gRPC server, in this process) keeps releasing new versions of a few tasks while a device
host (`python -m walle.device_host.killloop_child`, a real DeviceHost syncing in the background) is
started and killed with SIGKILL at random moments. At the end the device syncs once more without a kill
and the script counts:

  kills               SIGKILLs sent while the host was running
  installs_completed  distinct task@version/release the host logged as installed, plus the final current ones
  reported            of those, how many the platform recorded as "installed"
  never_reported      completed installs with no "installed" delivery report
  duplicates          "installed" reports repeating the same task's previous report (same version and release)
  runnable / tasks    tasks whose `current` version folder holds exactly the released files (entry included)

Usage: python bench/bench_install_killloop.py [--kills 60] [--seed 1]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

from walle.device_host.identity import Credentials
from walle.platform.manifest import validate_task_files
from walle.platform.server import build_server
from walle.platform.service import Platform
from walle.protos import admin_pb2, bundle

TASKS = ("ka", "kb", "kc")
FILES_PER_TASK = 80
FILE_BYTES = 6_000

# A launcher imports the device host once and forks a fresh device host process per start (as a zygote
# would), so 50+ kill/restart rounds fit in a minute on a loaded machine. Each forked child builds its
# own DeviceHost (own channel, threads and files) and is what gets SIGKILLed.
LAUNCHER = """
import logging, os, sys, time
from walle.device_host.host import DeviceHost
data = sys.argv[1]
for line in sys.stdin:
    cmd, arg = line.split()
    if cmd == "reap":
        os.waitpid(int(arg), 0)
        print("reaped", arg, flush=True)
        continue
    pid = os.fork()
    if pid:
        print("pid", pid, flush=True)
        continue
    fd = os.open(arg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    host = DeviceHost(data)
    if cmd == "loop":
        host.start(watch=False)
        print("ready", os.getpid(), flush=True)
        while True:
            time.sleep(3600)
    host.sync_now()
    ok = host.up.flush(timeout=20)
    host.close()
    print("final", ok, flush=True)
    os._exit(0)
"""


class Launcher:
    def __init__(self, python: str, data: pathlib.Path, env: dict):
        self.proc = subprocess.Popen([python, "-c", LAUNCHER, str(data)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def _cmd(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _read(self, *words: str) -> dict[str, str]:
        """The next lines starting with each of `words`, in whatever order they come (the forked child
        may print before its parent does)."""
        got: dict[str, str] = {}
        while len(got) < len(words):
            line = self.proc.stdout.readline()
            word = line.split(" ", 1)[0]
            if word not in words:
                raise RuntimeError(f"device host launcher said {line!r}, expected {words}")
            got[word] = line.split()[1]
        return got

    def start(self, mode: str, log: pathlib.Path) -> int:
        self._cmd(f"{mode} {log}")
        return int(self._read("pid", "ready" if mode == "loop" else "final")["pid"])

    def reap(self, pid: int) -> None:
        self._cmd(f"reap {pid}")
        self._read("reaped")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def task_files(name: str, n: int) -> dict[str, bytes]:
    rnd = random.Random(f"{name}-{n}")
    files = {"task.toml": (f'name = "{name}"\nentry = "main.py"\napis = ["log"]\nmin_host_version = "0.1.0"\n'
                           ).encode(),
             "main.py": f"VERSION = {n}\n\ndef main(event):\n    return {{'task': '{name}', 'v': VERSION}}\n".encode()}
    for i in range(FILES_PER_TASK):
        files[f"lib/m{i:02d}.py"] = (f"# {name} v{n} file {i}\nDATA = {rnd.getrandbits(64)!r}\n"
                                     + "# " + "x" * FILE_BYTES + "\n").encode()
    return files


class Plat:
    def __init__(self, root: pathlib.Path):
        self.platform = Platform(root / "platform")
        self.server, self.port, self.stop = build_server(self.platform, port=0)
        self.address = f"127.0.0.1:{self.port}"
        self.n = 0
        self.files: dict[tuple[str, str], dict[str, bytes]] = {}

    def release(self, name: str, rnd: random.Random | None = None) -> str:
        """A new version of `name`, or (with rnd) sometimes an older version again or a revoke (a drop)."""
        roll = rnd.random() if rnd else 0.0
        old = [v for (t, v) in self.files if t == name]
        if roll > 0.8:
            for r in self.platform.state.releases(task=name, active_only=True):
                self.platform.RevokeRelease(admin_pb2.ReleaseRef(id=r["id"]))
            return ""
        if roll > 0.55 and old:
            version = rnd.choice(old[-3:])
        else:
            self.n += 1
            files = task_files(name, self.n)
            validate_task_files(files)
            tv = self.platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), author="bench"))
            version = tv.version
            self.files[(name, version)] = files
        self.platform.CreateRelease(admin_pb2.CreateReleaseRequest(task=name, version=version))
        return version

    def installed_reports(self, device_id: str) -> tuple[dict[tuple[str, str, str], int], int]:
        """Installed reports per task@version/release, and how many repeat the task's previous report: a
        repeat is a duplicate (a task installed again under the same release reports another install first)."""
        with self.platform.state.transaction() as db:
            rows = db.execute("SELECT task, version, release_id FROM deliveries WHERE device_id=? AND "
                              "status='installed' ORDER BY seq", [device_id]).fetchall()
        counts: dict[tuple[str, str, str], int] = {}
        last: dict[str, tuple] = {}
        repeats = 0
        for t, v, r in rows:
            counts[(t, v, r)] = counts.get((t, v, r), 0) + 1
            repeats += last.get(t) == (v, r)
            last[t] = (v, r)
        return counts, repeats


def runnable(data: pathlib.Path, name: str, plat: Plat) -> tuple[bool, str]:
    """The task's current version folder holds exactly the released files: what a run would load."""
    try:
        pointer = json.loads((data / "tasks" / name / "current.json").read_text())
        version, release = pointer["current"]["version"], pointer["current"]["release_id"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return False, f"no readable current.json: {e}"
    want = plat.files.get((name, version))
    folder = data / "tasks" / name / version
    if want is None:
        return False, f"current {version[:12]} is not a released version"
    got = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
           and not p.name.startswith(".walle")} if folder.is_dir() else {}
    if got != want:
        missing = sorted(set(want) - set(got))[:3]
        return False, f"current {version[:12]}: {len(got)}/{len(want)} files, missing {missing}"
    try:
        compile(got["main.py"], "main.py", "exec")
    except SyntaxError as e:
        return False, f"entry does not compile: {e}"
    return True, (version, release)


def run(kills: int = 60, seed: int = 1, workdir: str | None = None, python: str = sys.executable,
        min_delay: float = 0.0, max_delay: float = 0.5, verbose: bool = False) -> dict:
    rnd = random.Random(seed)
    root = pathlib.Path(workdir or tempfile.mkdtemp(prefix="walle-killloop-"))
    plat = Plat(root)
    data = root / "device"
    try:
        token = plat.platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="kill-phone")).token
        Credentials("kill-phone", token, plat.address).save(data / "credentials.json")
        for name in TASKS:
            plat.release(name)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        logged: set[tuple[str, str, str]] = set()
        pat = re.compile(r"installed (\w+)@([0-9a-f]+) \(release ([^)]*)\)")
        logs = root / "logs"
        logs.mkdir()
        launcher = Launcher(python, data, env)
        sent = partial = 0
        partial_seen: list[str] = []
        t0 = time.perf_counter()
        try:
            while sent < kills:
                for name in rnd.sample(TASKS, 2):   # releases land while the host is down or starting
                    plat.release(name, rnd)
                log_file = logs / f"{sent}.log"
                pid = launcher.start("loop", log_file)   # returns once the host runs its first sync
                time.sleep(rnd.uniform(min_delay, max_delay))
                os.kill(pid, signal.SIGKILL)
                launcher.reap(pid)
                sent += 1
                logged.update(m.groups() for m in map(pat.search, log_file.read_text().splitlines()) if m)
                # Version folders the host could take for installed: not `*.tmp`, not under a `.trash-*`.
                broken = [d for d in (data / "tasks").glob("*/*") if d.is_dir() and not d.name.endswith(".tmp")
                          and not d.name.startswith(".") and not d.parent.name.startswith(".")
                          and not (d / "main.py").exists()]
                partial += len(broken)
                for d in broken:
                    partial_seen.append(f"after kill {sent}: {d.relative_to(data)} holds "
                                        f"{sorted(p.name for p in d.iterdir())[:5]}")
                if verbose:
                    print(f"kill {sent}: {len(logged)} installs logged so far", file=sys.stderr)
            loop_s = time.perf_counter() - t0
            for name in TASKS:  # a dropped task comes back as one of its older versions (a folder seen before)
                if not plat.platform.state.releases(task=name, active_only=True):
                    plat.platform.CreateRelease(admin_pb2.CreateReleaseRequest(
                        task=name, version=rnd.choice([v for (t, v) in plat.files if t == name][-3:])))
            launcher.start("final", logs / "final.log")
        finally:
            launcher.close()
        final_log = (logs / "final.log").read_text() if (logs / "final.log").exists() else ""
        logged.update(m.groups() for m in map(pat.search, final_log.splitlines()) if m)
        checks = {name: runnable(data, name, plat) for name in TASKS}
        completed = set(logged)
        for name, (ok, cur) in checks.items():
            if ok and (name, cur[0][:12], cur[1]) not in logged:
                completed.add((name, cur[0], cur[1]))
        reports, repeats = plat.installed_reports("kill-phone")
        # Log lines cut versions to 12 characters: match them as prefixes.
        def count(tvr):
            return sum(n for (t, v, r), n in reports.items() if t == tvr[0] and v.startswith(tvr[1]) and r == tvr[2])
        counts = {tv: count(tv) for tv in completed}
        return {
            "kills": sent, "loop_seconds": round(loop_s, 1), "partial_folders_seen_after_kills": partial,
            "partial_folders": partial_seen[:5],
            "installs_completed": len(completed),
            "reported": sum(1 for n in counts.values() if n >= 1),
            "never_reported": sum(1 for n in counts.values() if n == 0),
            "duplicates": repeats,
            "runnable": sum(1 for ok, _ in checks.values() if ok), "tasks": len(TASKS),
            "not_runnable": {n: why for n, (ok, why) in checks.items() if not ok},
        }
    finally:
        plat.stop(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-delay", type=float, default=0.8)
    ap.add_argument("-v", action="store_true")
    a = ap.parse_args()
    print(json.dumps(run(a.kills, a.seed, max_delay=a.max_delay, verbose=a.v), indent=2))


if __name__ == "__main__":
    main()
