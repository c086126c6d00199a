"""`walle demo`: walle end to end on embedded defaults, over real gRPC on 127.0.0.1.

Part 1 (seconds): a platform server on a temporary folder; the example task is submitted, released
to Android devices on app 2.x, and two devices with different attributes show what they receive.
Part 2 (minutes): the CoDA work cycle on MovieLens-100k with every user as an emulated device,
ending with Cloud vs Local vs CoDA test metrics, the per-device cost, results.json and a plot."""
from __future__ import annotations

import importlib.resources
import pathlib
import tempfile

import grpc
from rich.console import Console
from rich.table import Table

from walle.protos import admin_pb2, bundle, device_pb2, device_pb2_grpc

from .auth import bearer_metadata
from .manifest import validate_task_dir
from . import pki
from .server import build_server, tls_credentials
from .service import Platform

console = Console()


def tasks_dir() -> pathlib.Path:
    """The example tasks shipped with walle (the repository's tasks/ folder).

    Resolved through a real file: `walle.tasks` is a namespace package, and an editable install
    links each file, so the folder itself may not be the repository's."""
    marker = importlib.resources.files("walle.tasks") / "hello" / "task.toml"
    return pathlib.Path(str(marker)).resolve().parent.parent


LARGE_FLEET = 1000  # more users than MovieLens-100k's 943: say what it will cost before starting


def run_demo(obj, data_dir: str | None = None, *, dataset: str = "movielens-100k", users: int = 0, days: int = 3,
             seeds: int = 1, out_dir: str = "demo-output", workers: int = 4, coda: bool = True,
             coda_options: dict | None = None) -> dict:
    """Part 1 (release rules), then the CoDA experiment; `coda_options`: more experiment.Config fields
    (k, global_epochs, task_config, ...)."""
    tmp = None
    if not data_dir:
        tmp = tempfile.TemporaryDirectory(prefix="walle-demo-")
        data_dir = tmp.name
    try:
        result = {"rules": _run(pathlib.Path(data_dir), obj.actor if obj else "demo")}
    finally:
        if tmp:
            tmp.cleanup()
    if coda:
        from .coda.experiment import Config, Experiment, print_results
        console.rule(f"[bold]CoDA on {dataset}[/bold]")
        exp = Experiment(Config(dataset=dataset, users=users, days=days, seeds=tuple(range(seeds)), out_dir=out_dir,
                                workers=workers, **(coda_options or {})), console)
        console.print(f"{len(exp.user_ids)} users as emulated devices, {days} days; "
                      f"train {len(exp.train)} / held-out test {len(exp.test)} interactions", highlight=False)
        if len(exp.user_ids) > LARGE_FLEET:  # e.g. all 6,040 MovieLens-1M users: hours, memory grows with it
            console.print(f"[yellow]{len(exp.user_ids)} devices in one process: 200 MovieLens-1M users took ~10 min "
                          f"and 1.1 GB here, and both grow with the users; --users N runs the first N[/yellow]")
        res = exp.run()
        print_results(res, console)
        console.print(f"results: {out_dir}/results.json, plot: {out_dir}/results.png "
                      f"({res['elapsed_s']:.0f} s)", highlight=False)
        result["coda"] = res
    return result


def _run(data_dir: pathlib.Path, actor: str) -> dict:
    keys = pki.init(data_dir / "platform")
    platform = Platform(data_dir / "platform", keys=keys)
    _server, port, stop = build_server(platform, port=0, credentials=tls_credentials(platform))
    console.rule("[bold]walle demo[/bold]")
    console.print(f"platform serving TLS on localhost:{port}, data in {data_dir}", highlight=False)
    try:
        _manifest, files = validate_task_dir(tasks_dir() / "hello")
        tv = platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), message="hello v1",
                                                              author=actor))
        console.print(f"submitted hello@{tv.version[:12]} (bundle {tv.bundle_digest[:19]}…)", highlight=False)
        rule = 'os == "android" and app_version >= "2.0"'
        rel = platform.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=tv.version, rule=rule,
                                                                    actor=actor))
        console.print(f"released as {rel.id}: rule {rule!r}, {rel.stage} {rel.rollout:g}%", highlight=False)
        devices = [
            device_pb2.DeviceInfo(user_id="alice", os="android", app_version="2.3.1", region="sg", host_version="0.1.0"),
            device_pb2.DeviceInfo(user_id="bob", os="ios", app_version="2.3.1", region="cn", host_version="0.1.0"),
        ]
        table = Table("device", "attributes", "receives")
        received = {}
        creds = grpc.ssl_channel_credentials(root_certificates=keys.ca_pem)
        with grpc.secure_channel(f"localhost:{port}", creds) as channel:
            stub = device_pb2_grpc.DeviceServiceStub(channel)
            for info in devices:
                enrolled = platform.EnrollDevice(admin_pb2.EnrollRequest(device_id=f"phone-{info.user_id}", actor=actor))
                reply = stub.GetActiveTasks(info, metadata=bearer_metadata(enrolled.token), timeout=10)
                got = [f"{t.name}@{t.version[:12]}" for t in reply.tasks]
                received[enrolled.device_id] = got
                table.add_row(enrolled.device_id, f"os={info.os} app={info.app_version} region={info.region}",
                              ", ".join(got) or "(nothing)")
        console.print(table)
        return {"port": port, "received": received}
    finally:
        stop()
