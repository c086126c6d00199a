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
    assert shown["stats"].get("delivered", 0) == 0
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
