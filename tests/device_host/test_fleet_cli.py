"""`walle fleet run` against a real server with operator-authenticated admin: the fleet enrolls its
devices, and with --cleanup revokes them at the end so no live temporary credentials remain."""
from click.testing import CliRunner

from walle.platform.cli import main
from walle.platform.server import build_server, operator_authorizer
from walle.platform.service import Platform
from walle.protos import admin_pb2


def test_fleet_run_cleanup_revokes_the_devices_it_enrolled(tmp_path, monkeypatch):
    monkeypatch.setenv("WALLE_CONFIG", str(tmp_path / "none.toml"))
    platform = Platform(tmp_path / "platform")
    token = platform.operators.create("ops", actor="test")
    _server, port, stop = build_server(platform, port=0, authorize_admin=operator_authorizer(platform))
    try:
        base = ["fleet", "run", "--platform", f"127.0.0.1:{port}", "--duration", "0.2",
                "--admin-token", token, "--base-dir"]
        res = CliRunner().invoke(main, [*base, str(tmp_path / "keep"), "--devices", "3"])
        assert res.exit_code == 0, res.output
        res = CliRunner().invoke(main, [*base, str(tmp_path / "tmp"), "--devices", "2", "--cleanup"])
        assert res.exit_code == 0, res.output
        assert "revoked the 2 devices" in res.output
        devices = platform.ListDevices(admin_pb2.Empty()).devices
        # the second run re-enrolled fleet-000000 and -000001 (a new token each) and revoked them
        assert {d.device_id: d.revoked for d in devices} == {"fleet-000000": True, "fleet-000001": True,
                                                             "fleet-000002": False}
        bad = CliRunner().invoke(main, [*base[:-1], "--admin-token", "wrong", "--devices", "1"])
        assert bad.exit_code == 6, bad.output  # the admin API refused the enrollment
    finally:
        stop(0)
