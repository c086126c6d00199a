"""Errors say what happened, over real gRPC on 127.0.0.1: one translation for every service (known
errors keep their status and message; anything else is INTERNAL with one logged traceback), auth
failures are a status and no traceback, and each admin call writes one access-log line."""
from __future__ import annotations

import logging
import pathlib
import re
import sqlite3
import sys

import grpc
import pytest

from walle.platform.auth import bearer_metadata
from walle.platform.server import operator_authorizer
from walle.platform.service import Platform
from walle.protos import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc, tunnel_pb2, tunnel_pb2_grpc

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_server_streams import setup_platform  # noqa: E402


class Env:
    def __init__(self, tmp_path, serve, authorize: bool = False):
        self.platform = p = Platform(tmp_path / "data")
        self.res = p.PublishResource(admin_pb2.PublishResourceRequest(name="models/m", data=b"weights" * 1000))
        _tv, self.md = setup_platform(p, tmp_path)  # a device released a task that may download resources
        self.op = bearer_metadata(p.operators.create("alice", actor="tester"))
        _s, port, self.stop = serve(p, port=0, authorize_admin=operator_authorizer(p) if authorize else None)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.dev = device_pb2_grpc.DeviceServiceStub(self.channel)
        self.tun = tunnel_pb2_grpc.TunnelServiceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)


@pytest.fixture
def env(tmp_path, serve):
    e = Env(tmp_path, serve)
    yield e
    e.channel.close()


@pytest.fixture
def authed(tmp_path, serve):
    e = Env(tmp_path, serve, authorize=True)
    yield e
    e.channel.close()


def status(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def tracebacks(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


def test_unexpected_errors_are_internal_and_logged_once_with_a_traceback(env, caplog):
    caplog.set_level(logging.DEBUG)
    # A truncated resource blob (device stream) and a corrupted database (admin call).
    blob = env.platform.blob_dir / env.res.digest.split(":", 1)[1]
    blob.write_bytes(blob.read_bytes()[:100])
    code, details = status(lambda: list(env.tun.FetchResource(tunnel_pb2.ResourceRequest(name="models/m"),
                                                              metadata=env.md, timeout=10)))
    assert (code, details) == (grpc.StatusCode.INTERNAL, "internal error in FetchResource: BundleError")
    with sqlite3.connect(env.platform.state.path) as db:
        db.execute("DROP TABLE audit")
    code, details = status(lambda: env.admin.GetAudit(admin_pb2.AuditRequest(limit=5), timeout=10))
    assert (code, details) == (grpc.StatusCode.INTERNAL, "internal error in GetAudit: OperationalError")

    logged = tracebacks(caplog)
    assert [r.name for r in logged] == ["walle.platform.server"] * 2
    assert "/walle.v1.TunnelService/FetchResource failed (a bug): BundleError" in logged[0].getMessage()
    assert "GetAudit failed (a bug): OperationalError: no such table: audit" in logged[1].getMessage()
    assert not [r for r in caplog.records if "Unexpected" in r.getMessage()]  # grpc's own catch-all
    # Known errors keep their status and message, on streams too, without a traceback.
    code, details = status(lambda: list(env.dev.FetchBundle(device_pb2.FetchBundleRequest(digest="sha256:" + "0" * 64),
                                                            metadata=env.md, timeout=10)))
    assert (code, details) == (grpc.StatusCode.PERMISSION_DENIED,
                               f"bundle sha256:{'0' * 64} is not released to device 'phone-1'")
    code, details = status(lambda: env.tun.GetResource(tunnel_pb2.ResourceRequest(name="nope"), metadata=env.md,
                                                       timeout=10))
    assert (code, details) == (grpc.StatusCode.NOT_FOUND, "unknown resource 'nope'")
    assert len(tracebacks(caplog)) == 2


def test_auth_failures_are_a_status_and_no_traceback(authed, caplog):
    caplog.set_level(logging.DEBUG)
    forged = bearer_metadata("wdt1.forged")
    calls = [
        lambda md: authed.dev.GetActiveTasks(device_pb2.DeviceInfo(), metadata=md, timeout=10),
        lambda md: list(authed.dev.FetchBundle(device_pb2.FetchBundleRequest(digest="sha256:00"), metadata=md,
                                               timeout=10)),
        lambda md: next(authed.dev.WatchTasks(device_pb2.WatchRequest(), metadata=md, timeout=10)),
        lambda md: authed.tun.Upload(iter([]), metadata=md, timeout=10),
        lambda md: list(authed.tun.FetchResource(tunnel_pb2.ResourceRequest(name="models/m"), metadata=md,
                                                 timeout=10)),
        lambda md: authed.admin.ListTasks(admin_pb2.Empty(), metadata=md, timeout=10),
    ]
    for md in [(), forged, authed.md]:  # none, forged, and a device credential on the admin API
        for i, call in enumerate(calls):
            if md is authed.md and i < len(calls) - 1:
                continue
            code, details = status(lambda: call(md))
            assert code == grpc.StatusCode.UNAUTHENTICATED, (i, code, details)
            assert "credential" in details
    assert status(lambda: calls[-1](()))[1] == \
        "ListTasks: missing operator credential (authorization: Bearer <operator token>)"
    assert tracebacks(caplog) == []
    lines = [r.getMessage() for r in caplog.records if r.name == "walle.platform.access"]
    assert len(lines) == 4 and all(re.fullmatch(r"admin ListTasks by - from \S+: UNAUTHENTICATED in [0-9.]+ ms "
                                                r"\(ListTasks: .*credential.*\)", x) for x in lines), lines


def test_each_admin_call_writes_one_access_log_line(authed, caplog):
    caplog.set_level(logging.INFO, logger="walle.platform.access")
    tasks = authed.admin.ListTasks(admin_pb2.Empty(), metadata=authed.op, timeout=10).tasks
    assert [t.name for t in tasks] == ["hello"]
    code, _ = status(lambda: authed.admin.GetRelease(admin_pb2.ReleaseRef(id="r999"), metadata=authed.op, timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND
    reply = authed.admin.EnrollDevice(admin_pb2.EnrollRequest(device_id="phone-2", actor="mallory"),
                                      metadata=authed.op, timeout=10)
    assert reply.device_id == "phone-2"
    lines = [r.getMessage() for r in caplog.records if r.name == "walle.platform.access"]
    assert len(lines) == 3, lines
    assert re.fullmatch(r"admin ListTasks by alice from ipv[46]:\S+: OK in [0-9.]+ ms", lines[0])
    assert re.fullmatch(r"admin GetRelease by alice from \S+: NOT_FOUND in [0-9.]+ ms \(unknown release 'r999'\)",
                        lines[1]), lines[1]
    # the audit trail names the authenticated operator, not the actor the client claimed
    assert lines[2].startswith("admin EnrollDevice by alice ")
    assert authed.platform.state.audit_entries(1)[0]["actor"] == "alice"
