"""The operator CLI's path and address handling, as an operator types it: a relative --data-dir
(the README's walkthrough), a port already in use, an invalid --platform, and no data folder at all.
Real processes where the server is involved; each error is one line and a documented exit code."""
from __future__ import annotations

import pathlib
import signal
import subprocess
import sys

import grpc
import pytest
from click.testing import CliRunner

from walle.platform.cli import main
from walle.platform.service import Platform
from walle.protos import admin_pb2, coda_pb2, coda_pb2_grpc

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_server_streams import start_serving, walle  # noqa: E402

CLEAN_ENV = {"WALLE_DATA_DIR": "", "WALLE_PLATFORM": "", "WALLE_CA": "", "WALLE_OPERATOR_TOKEN": ""}


@pytest.fixture
def no_config(tmp_path, monkeypatch):
    """Nothing configured: no WALLE_* variables and a config file that does not exist."""
    for key in CLEAN_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WALLE_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def env_for(tmp_path: pathlib.Path, **extra) -> dict:
    return {**CLEAN_ENV, "WALLE_CONFIG": str(tmp_path / "no-config.toml"), **extra}


@pytest.mark.slow
def test_relative_data_dir_as_the_readme_writes_it(tmp_path):
    env = env_for(tmp_path)
    res = walle("--data-dir", "./wd", "platform", "init", "--json", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    token = __import__("json").loads(res.stdout)["operator_token"]
    device = Platform(tmp_path / "wd").EnrollDevice(admin_pb2.EnrollRequest(device_id="phone-1")).token
    # the CoDA service is on by default: its store must land in ./wd/coda, not /wd/coda
    proc, port = start_serving(["--data-dir", "./wd", "platform", "serve", "--port", "0"], tmp_path, env)
    try:
        assert (tmp_path / "wd" / "coda" / "kv.sqlite3").is_file()
        remote = env_for(tmp_path, WALLE_OPERATOR_TOKEN=token, WALLE_CA="./wd/pki/ca.pem")
        res = walle("--platform", f"localhost:{port}", "task", "list", "--json", cwd=tmp_path, env=remote)
        assert res.returncode == 0, res.stderr
        creds = grpc.ssl_channel_credentials((tmp_path / "wd" / "pki" / "ca.pem").read_bytes())
        with grpc.secure_channel(f"localhost:{port}", creds) as channel:
            stub = coda_pb2_grpc.SampleServiceStub(channel)
            with pytest.raises(grpc.RpcError) as e:
                stub.ListBatches(coda_pb2.ListBatchesRequest(day=1), timeout=10,
                                 metadata=[("authorization", f"Bearer {device}")])
            assert e.value.code() == grpc.StatusCode.NOT_FOUND  # served: nothing prepared yet for that day
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not pathlib.Path("/wd").exists()


def test_port_in_use_is_one_line_and_exit_code_5(tmp_path, serve):
    busy = Platform(tmp_path / "wd")
    _s, port, _stop = serve(busy, port=0)
    res = walle("--data-dir", "./wd", "platform", "serve", "--insecure", "--no-coda", "--port", str(port),
                cwd=tmp_path, env=env_for(tmp_path), timeout=60)
    assert res.returncode == 5, res.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in res.stderr and "choose another --port" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("addr", ["localhost:99999", "localhost", "localhost:0", "local host:50051", ":50051"])
def test_invalid_platform_address_is_refused(no_config, addr):
    res = CliRunner().invoke(main, ["--platform", addr, "task", "list"])
    assert res.exit_code == 2, res.output
    assert f"--platform {addr!r} is not HOST:PORT with a port in 1..65535" in res.output


def test_valid_platform_addresses_are_accepted(no_config):
    from walle.platform.cli.context import platform_address
    for addr in ("localhost:50051", "127.0.0.1:1", "[::1]:65535", "walle.example.com:443"):
        assert platform_address(addr) == addr


def test_no_data_folder_is_an_error_not_an_empty_platform(no_config, monkeypatch):
    res = CliRunner().invoke(main, ["task", "list"])
    assert res.exit_code == 2, res.output
    assert "no platform data folder: pass --data-dir DIR" in res.output
    assert not (no_config / "walle-data").exists()
    for args in (["device", "list"], ["audit"], ["operator", "create", "bob"]):
        assert CliRunner().invoke(main, args).exit_code == 2
    assert not (no_config / "walle-data").exists()
    # `platform init` is the one command that creates the default folder; then it is used
    res = CliRunner().invoke(main, ["platform", "init"])
    assert res.exit_code == 0, res.output
    assert (no_config / "walle-data" / "pki" / "ca.pem").is_file()
    res = CliRunner().invoke(main, ["--json", "audit"])
    assert res.exit_code == 0 and "operator.create" in res.output
    # an explicit folder is resolved against the directory the command runs in
    sub = no_config / "sub"
    sub.mkdir()
    monkeypatch.chdir(sub)
    assert CliRunner().invoke(main, ["audit"]).exit_code == 2  # no ./walle-data here
    res = CliRunner().invoke(main, ["--data-dir", "../walle-data", "--json", "audit"])
    assert res.exit_code == 0 and "operator.create" in res.output
    res = CliRunner().invoke(main, ["--json", "audit"], env={"WALLE_DATA_DIR": "../walle-data"})
    assert res.exit_code == 0 and "operator.create" in res.output
