"""A real platform: a data folder in tmp_path and a gRPC server on 127.0.0.1 (ephemeral port)."""
import pathlib
import shutil

import grpc
import pytest

from walle.platform.auth import bearer_metadata
from walle.platform.manifest import validate_task_dir
from walle.platform.server import build_server
from walle.platform.service import Platform
from walle.protos import admin_pb2, bundle, device_pb2, device_pb2_grpc, tunnel_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parents[2]


class Live:
    def __init__(self, tmp_path: pathlib.Path):
        self.tmp = tmp_path
        self.platform = Platform(tmp_path / "data")
        self.server, self.port, self.stop = build_server(self.platform, port=0)
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.devices = device_pb2_grpc.DeviceServiceStub(self.channel)
        self.tunnel = tunnel_pb2_grpc.TunnelServiceStub(self.channel)

    def submit(self, src: pathlib.Path, message: str = "") -> admin_pb2.TaskVersion:
        _m, files = validate_task_dir(src)
        return self.platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), message=message,
                                                                    author="tester"))

    def hello_variant(self, name: str, text: str) -> pathlib.Path:
        """A copy of tasks/hello with main.py changed: a new version of the same task."""
        dst = self.tmp / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(ROOT / "tasks" / "hello", dst)
        (dst / "main.py").write_text((dst / "main.py").read_text() + f"\n# {text}\n")
        return dst

    def enroll(self, device_id: str) -> tuple:
        reply = self.platform.EnrollDevice(admin_pb2.EnrollRequest(device_id=device_id, actor="tester"))
        return bearer_metadata(reply.token)

    def active(self, md, **attrs) -> list[str]:
        """name@version of what GetActiveTasks gives the device with these attributes."""
        attrs.setdefault("host_version", "0.1.0")  # tasks/hello needs host >= 0.1.0
        reply = self.devices.GetActiveTasks(device_pb2.DeviceInfo(**attrs), metadata=md, timeout=10)
        return [f"{t.name}@{t.version}" for t in reply.tasks]

    def release(self, task, version="", **kw) -> admin_pb2.Release:
        return self.platform.CreateRelease(admin_pb2.CreateReleaseRequest(task=task, version=version,
                                                                          has_rollout="rollout" in kw, **kw))

    def close(self):
        self.channel.close()
        self.stop(0)


@pytest.fixture
def live(tmp_path):
    lv = Live(tmp_path)
    yield lv
    lv.close()
