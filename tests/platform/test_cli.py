"""The `walle` CLI on a real data folder: every command group answers, --json parses with numbers as
numbers, errors exit with the documented codes (as JSON objects under --json)."""
import json
import pathlib

import pytest
from click.testing import CliRunner

from walle.platform.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def walle(tmp_path, monkeypatch):
    monkeypatch.setenv("WALLE_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.delenv("WALLE_PLATFORM", raising=False)
    data = tmp_path / "data"

    def run(*args, code=0):
        res = CliRunner().invoke(main, ["--data-dir", str(data), "--actor", "ann", *args])
        assert res.exit_code == code, (args, res.output, res.exception)
        return res
    run.data = data
    return run


def _json(res):
    return json.loads(res.output)


def test_submit_release_and_inspect_with_json_numbers(walle):
    tv = _json(walle("--json", "task", "submit", str(ROOT / "tasks" / "hello"), "-m", "v1"))
    assert tv["name"] == "hello" and isinstance(tv["bundle_size"], int) and isinstance(tv["created_at"], int)
    rel = _json(walle("release", "create", "hello", "--rule", 'os == "android"', "--json"))
    assert rel["task"] == "hello" and isinstance(rel["created_at"], int)
    listed = _json(walle("release", "list", "--json"))
    assert [r["id"] for r in listed["releases"]] == [rel["id"]]
    shown = _json(walle("--json", "release", "show", rel["id"]))
    stats = shown["health"]["release"]["stats"]
    assert stats["delivered"] == 0 and isinstance(stats["delivered"], int)  # zero is printed, as a number
    assert shown["health"]["targeted"] == 0 and shown["guard"] is None
    assert "hello" in walle("task", "list").output
    audit = _json(walle("audit", "--json"))
    assert {"task.submit", "release.create"} <= {e["action"] for e in audit["entries"]}
    assert all(isinstance(e["ts"], int) for e in audit["entries"])
    assert all(e["actor"] == "ann" for e in audit["entries"])


def test_data_dir_given_on_the_subcommand(tmp_path, monkeypatch):
    monkeypatch.setenv("WALLE_CONFIG", str(tmp_path / "no-config.toml"))
    res = CliRunner().invoke(main, ["task", "submit", str(ROOT / "tasks" / "hello"), "--data-dir", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "d").is_dir()


@pytest.mark.parametrize("args,code,grpc_code", [
    (["release", "show", "r999"], 3, "NOT_FOUND"),
    (["release", "create", "nosuch"], 3, "NOT_FOUND"),
    (["device", "preview", "--attrs", "colour=red"], 2, "INVALID_ARGUMENT"),
    (["task", "show", "@v1"], 2, "INVALID_ARGUMENT"),
])
def test_errors_exit_with_documented_codes_and_json_objects(walle, args, code, grpc_code):
    plain = walle(*args, code=code)
    assert plain.output.startswith("error: ")
    res = walle("--json", *args, code=code)
    err = _json(res)["error"]
    assert err["code"] == grpc_code and err["exit_code"] == code and err["message"]


def test_unreachable_platform_exits_8(tmp_path, monkeypatch):
    monkeypatch.setenv("WALLE_CONFIG", str(tmp_path / "no-config.toml"))
    res = CliRunner().invoke(main, ["--platform", "127.0.0.1:1", "--insecure", "--json", "task", "list"])
    assert res.exit_code == 8, res.output
    assert json.loads(res.output.splitlines()[-1])["error"]["code"] == "UNAVAILABLE"


def test_tables_fit_80_columns_and_wide_shows_cells_whole(walle):
    walle("task", "submit", str(ROOT / "tasks" / "hello"))
    rule = 'os == "android" and app_version >= "2.3" and region in ["cn-east", "cn-north", "overseas"]'
    walle("release", "create", "hello", "--rule", rule, "--rollout", "10")
    res = walle("release", "list")
    lines = res.output.splitlines()
    assert all(len(line) <= 80 for line in lines), res.output
    header = next(line for line in lines if line.strip().startswith("id"))
    for name in ("id", "task@version", "state", "stage", "rule", "deliv/ran/fail", "p50"):
        assert name in header.split(), header
    assert "…" in res.output and rule not in res.output and "--wide" in res.output
    wide = walle("--wide", "release", "list").output
    assert all(len(line) <= 80 for line in wide.splitlines())
    wlines = wide.splitlines()
    start, end = wlines[0].index("rule"), wlines[0].index("deliv/ran/fail")
    column = " ".join(line[start:end].strip() for line in wlines[2:])
    assert " ".join(column.split()) == rule  # folded over lines, but all there


def test_enroll_writes_the_token_to_a_private_file_not_the_terminal(walle, tmp_path):
    out = tmp_path / "phone.json"
    res = walle("device", "enroll", "--device-id", "phone-1", "--out", str(out))
    cred = json.loads(out.read_text())
    assert cred["device_id"] == "phone-1" and len(cred["token"]) > 20
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    assert cred["token"] not in res.output and str(out) in res.output
    again = walle("--json", "device", "enroll", "--device-id", "phone-1", "--out", str(out), code=4)
    assert json.loads(again.output)["error"]["code"] == "ALREADY_EXISTS"
    assert json.loads(out.read_text())["token"] == cred["token"]  # the refused call changed nothing
    forced = json.loads(walle("--json", "device", "enroll", "--device-id", "phone-1", "--out", str(out),
                              "--force", "--user-id", "u7").output)
    assert forced == {"device_id": "phone-1", "user_id": "u7", "credentials_file": str(out), "ttl_seconds": 0}
    assert json.loads(out.read_text())["user_id"] == "u7"  # the device host keeps its bound user
    assert json.loads(out.read_text())["token"] != cred["token"]


def test_data_folder_is_ignored_by_git(walle, tmp_path):
    import subprocess
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    walle("platform", "init")
    assert (walle.data / ".gitignore").exists() and (walle.data / "pki" / "ca-key.pem").exists() or \
        any((walle.data / "pki").glob("*key*"))
    status = subprocess.run(["git", "-C", str(tmp_path), "status", "--porcelain", "--untracked-files=all"],
                            capture_output=True, text=True, check=True).stdout
    assert "data/" not in status, status


def test_observe_commands_work_against_a_remote_platform(tmp_path, monkeypatch):
    from walle.platform.server import build_server, operator_authorizer
    from walle.platform.service import Platform
    monkeypatch.setenv("WALLE_CONFIG", str(tmp_path / "no-config.toml"))
    platform = Platform(tmp_path / "data")
    monkeypatch.setenv("WALLE_OPERATOR_TOKEN", platform.operators.create("ann", actor="test"))
    _server, port, stop = build_server(platform, port=0, authorize_admin=operator_authorizer(platform))
    try:
        def run(*args, code=0):
            res = CliRunner().invoke(main, ["--platform", f"127.0.0.1:{port}", "--insecure", "--json", *args])
            assert res.exit_code == code, (args, res.output)
            return res.stdout  # the --insecure warning goes to stderr
        run("task", "submit", str(ROOT / "tasks" / "hello"))
        rid = json.loads(run("release", "create", "hello", "--max-failure-rate", "5%"))["release"]["id"]
        shown = json.loads(run("release", "show", rid))
        assert shown["guard"]["status"] == "watching" and shown["guard"]["min_runs"] == 50
        assert shown["health"]["release"]["created_by"] == "ann"  # the operator, from the token
        assert run("logs", "--release", rid) == ""  # no runs yet: nothing on stdout
        assert [o["name"] for o in json.loads(run("operator", "list"))["operators"]] == ["ann"]
        audit = json.loads(run("audit", "--exclude", "operator.", "--actor", "ann"))
        assert [e["action"] for e in audit["entries"]] == ["release.guard", "release.create", "task.submit"]
        assert json.loads(run("device", "show", "nosuch", code=3))["error"]["code"] == "NOT_FOUND"
    finally:
        stop(0)
