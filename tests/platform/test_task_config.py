"""Task config: the [config] schema in task.toml, per-release values (`--set`), what devices receive
(signed with the bundle) and what a task reads through `walle.config`."""
from __future__ import annotations

import json
import pathlib

import pytest
from click.testing import CliRunner

from walle.device_host.host import DeviceHost
from walle.device_host.hostapi import HostAPI
from walle.device_host.identity import Credentials
from walle.device_host.sandbox import Sandbox
from walle.device_host.storage import TaskStorage
from walle.platform import pki, taskconfig
from walle.platform.cli import main as cli
from walle.platform.errors import InvalidArgument
from walle.platform.manifest import Manifest, parse_manifest, validate_task_dir
from walle.platform.server import build_server, tls_credentials
from walle.platform.service import Platform
from walle.protos import admin_pb2, bundle, device_pb2

TOML = """name = "tuned"
entry = "main.py"
apis = ["log"]

[config.sigma]
type = "float"
default = 0.2
min = 0.0
max = 1.0
help = "keep outside samples scored at or above sigma"

[config.K]
type = "int"
default = 5
min = 1
max = 100
help = "neighbours"

[config.metric]
type = "str"
default = "auc"
choices = ["auc", "logloss"]
help = "validation metric"

[config.warm]
type = "bool"
default = false
"""
MAIN = """from walle import config


def main(event):
    everything = config.all()
    return {"sigma": config.get("sigma"), "K": config.get("K"), "all": everything}
"""


@pytest.fixture
def task_dir(tmp_path) -> pathlib.Path:
    d = tmp_path / "tasks" / "tuned"
    d.mkdir(parents=True)
    (d / "task.toml").write_text(TOML)
    (d / "main.py").write_text(MAIN)
    return d


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=1) as sb:
        yield sb


def test_schema_is_parsed_typed_and_round_trips():
    m = parse_manifest(TOML)
    params = {p.name: p for p in m.config}
    assert params["sigma"].default == 0.2 and params["sigma"].min == 0.0 and params["sigma"].max == 1.0
    assert params["K"].default == 5 and params["metric"].choices == ("auc", "logloss")
    assert params["warm"].default is False and params["sigma"].help.startswith("keep")
    assert Manifest.from_proto(m.to_proto()) == m
    assert parse_manifest(m.to_toml()) == m


@pytest.mark.parametrize("spec, error", [
    ('type = "double"\ndefault = 1.0', "config.x.type must be one of int, float, bool, str"),
    ('type = "float"', "config.x.default is required"),
    ('type = "float"\ndefault = 2.0\nmax = 1.0', "config.x.default: x must be in [-inf, 1.0] (got 2.0)"),
    ('type = "int"\ndefault = 1.5', "x must be an integer (got 1.5)"),
    ('type = "int"\ndefault = true', "x must be an integer (got True)"),
    ('type = "int"\ndefault = 1\nmin = 5\nmax = 2', "min 5 is above max 2"),
    ('type = "bool"\ndefault = true\nmin = 0', "config.x.min is only for int and float parameters"),
    ('type = "str"\ndefault = "c"\nchoices = ["a", "b"]', "x must be one of 'a', 'b' (got 'c')"),
    ('type = "float"\ndefault = 1.0\nstep = 0.1', "unknown key 'step'"),
    ('type = "float"\ndefault = nan', "must be a finite number"),
])
def test_bad_schemas_are_refused_at_submit(spec, error):
    with pytest.raises(InvalidArgument) as e:
        parse_manifest(f'name = "t"\nentry = "main.py"\n\n[config.x]\n{spec}\n')
    assert error in e.value.message


def test_resolve_overrides_and_errors():
    schema = parse_manifest(TOML).config
    assert taskconfig.resolve(schema, {}, "r") == {"K": 5, "metric": "auc", "sigma": 0.2, "warm": False}
    got = taskconfig.resolve(schema, taskconfig.parse_sets(["sigma=1", "K=7", "warm=yes", "metric=logloss"]), "r")
    assert got == {"K": 7, "metric": "logloss", "sigma": 1.0, "warm": True} and isinstance(got["sigma"], float)
    for sets, error in [(["sigma=1.5"], "sigma must be in [0.0, 1.0] (got 1.5)"),
                        (["sigma=abc"], "sigma must be a number (got 'abc')"),
                        (["K=2.5"], "K must be an integer (got '2.5')"),
                        (["metric=mse"], "metric must be one of 'auc', 'logloss'"),
                        (["warm=maybe"], "warm must be true or false"),
                        (["sigmaa=0.1"], "unknown config key 'sigmaa' (declared: K, metric, sigma, warm)"),
                        (["sigma"], "expected KEY=VALUE"), (["K=1", "K=2"], "given twice")]:
        with pytest.raises(InvalidArgument) as e:
            taskconfig.resolve(schema, taskconfig.parse_sets(sets), "r")
        assert error in e.value.message, (sets, e.value.message)
    assert taskconfig.to_json({"b": 1, "a": 0.5}) == '{"a":0.5,"b":1}' and taskconfig.to_json({}) == ""


def test_cli_release_set_show_and_audit(task_dir, tmp_path):
    run = CliRunner()
    base = ["--data-dir", str(tmp_path / "data")]
    assert run.invoke(cli, base + ["task", "submit", str(task_dir)]).exit_code == 0
    shown = run.invoke(cli, base + ["task", "show", "tuned"]).output
    assert "config sigma: float = 0.2 in [0.0, 1.0]  keep outside samples" in shown
    assert 'config metric: str = "auc" one of "auc", "logloss"  validation metric' in shown
    bad = run.invoke(cli, base + ["release", "create", "tuned", "--set", "sigma=2"])
    assert bad.exit_code == 2 and "sigma must be in [0.0, 1.0] (got 2.0)" in bad.output
    bad = run.invoke(cli, base + ["release", "create", "tuned", "--set", "sigam=0.3"])
    assert bad.exit_code == 2 and "unknown config key 'sigam'" in bad.output
    assert json.loads(run.invoke(cli, base + ["--json", "release", "list"]).output).get("releases", []) == []  # nothing was stored

    rel = json.loads(run.invoke(cli, base + ["--json", "release", "create", "tuned", "--set", "sigma=0.35",
                                             "--set", "metric=logloss"]).output)
    assert json.loads(rel["config_json"]) == {"K": 5, "metric": "logloss", "sigma": 0.35, "warm": False}
    shown = run.invoke(cli, base + ["release", "show", rel["id"]]).output
    assert 'config: K=5, metric="logloss", sigma=0.35, warm=false' in shown
    audit = json.loads(run.invoke(cli, base + ["--json", "audit"]).output)["entries"]
    create = next(e for e in audit if e["action"] == "release.create")
    assert json.loads(create["detail"])["config"]["sigma"] == 0.35


def test_two_releases_deliver_different_config_to_two_user_buckets(task_dir, tmp_path, sandbox):
    """An A/B test with the CLI's operations alone: same version, sigma 0.2 for everyone, then sigma 0.6
    for the users of one rule; devices get their arm's value over real gRPC (TLS, signed) and the task
    reads it in the sandbox."""
    keys = pki.init(tmp_path / "p")
    platform = Platform(tmp_path / "p", keys=keys)
    _s, port, stop = build_server(platform, port=0, credentials=tls_credentials(platform))
    hosts = []
    try:
        _m, files = validate_task_dir(task_dir)
        tv = platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), author="t"))
        r_a = platform.CreateRelease(admin_pb2.CreateReleaseRequest(task="tuned", version=tv.version))
        r_b = platform.CreateRelease(admin_pb2.CreateReleaseRequest(
            task="tuned", version=tv.version, rule='user_id in ["bob", "carol"]', config={"sigma": "0.6"}))
        assert r_b.version == r_a.version and r_b.bundle_digest == r_a.bundle_digest  # one shared bundle
        got = {}
        for user in ("ann", "bob", "carol", "dave"):
            r = platform.EnrollDevice(admin_pb2.EnrollRequest(device_id=f"phone-{user}", user_id=user))
            cred = Credentials(f"phone-{user}", r.token, f"localhost:{port}", r.platform_ca_pem,
                               r.bundle_public_key.hex())
            host = DeviceHost(tmp_path / user, attrs={"user_id": user}, sandbox=sandbox, credentials=cred)
            hosts.append(host)
            assert host.sync_now().installed == [f"tuned@{tv.version}"]
            res = host.run_task("tuned", {})
            assert res.status == "ok", res.error
            got[user] = (host.installed()["tuned"].release_id, res.value["sigma"], res.value["all"])
        assert {u: v[:2] for u, v in got.items()} == {"ann": (r_a.id, 0.2), "bob": (r_b.id, 0.6),
                                                       "carol": (r_b.id, 0.6), "dave": (r_a.id, 0.2)}
        assert got["bob"][2] == {"K": 5, "metric": "auc", "sigma": 0.6, "warm": False}

        # The config is covered by the signature: a device refuses a tampered value, keeps what it runs.
        ann = hosts[0]
        task = platform.Preview(device_pb2.DeviceInfo(user_id="ann", host_version="0.1.0")).tasks[0]
        assert ann._accept(task) is None
        forged = device_pb2.ActiveTask()
        forged.CopyFrom(task)
        forged.config_json = task.config_json.replace('"sigma":0.2', '"sigma":0.9')
        assert forged.config_json != task.config_json
        assert "signature invalid" in ann._accept(forged)

        # Ann's bucket moves to arm B: same version, new release, new config; no new download.
        platform.CreateRelease(admin_pb2.CreateReleaseRequest(
            task="tuned", version=tv.version, rule='user_id == "ann"', config={"sigma": "0.9", "K": "9"}))
        assert ann.sync_now().installed == []  # same code: re-pointed to the new release, nothing fetched
        assert ann.installed()["tuned"].release_id != r_a.id
        assert ann.run_task("tuned", {}).value["all"] == {"K": 9, "metric": "auc", "sigma": 0.9, "warm": False}
        assert hosts[3].sync_now() and hosts[3].run_task("tuned", {}).value["sigma"] == 0.2
    finally:
        for h in hosts:
            h.close()
        stop(0)


def test_sandbox_run_reads_config_defaults_and_refuses_unknown_keys(task_dir, tmp_path, sandbox):
    """What a local run does (`walle task run`): defaults resolved from task.toml, optional --set."""
    m, files = validate_task_dir(task_dir)
    src = {p: d.decode() for p, d in files.items() if p.endswith(".py")}
    cfg = taskconfig.resolve(m.config, taskconfig.parse_sets(["K=3"]), "local run")
    api = HostAPI(TaskStorage(tmp_path / "s.db"), "tuned", config=cfg)
    res = sandbox.run(src, "main.py", {}, api_handler=api, allowed_apis=api.allowed_apis())
    assert res.status == "ok", res.error
    assert res.value == {"sigma": 0.2, "K": 3, "all": {"K": 3, "metric": "auc", "sigma": 0.2, "warm": False}}
    typo = dict(src, **{"main.py": "from walle import config\ndef main(event):\n    return config.get('sigmaa')\n"})
    res = sandbox.run(typo, "main.py", {}, api_handler=api, allowed_apis=api.allowed_apis())
    assert res.status == "error" and "config key 'sigmaa' is not declared in task.toml" in res.error


def test_rollback_releases_the_target_with_the_config_it_last_ran_with(task_dir, tmp_path):
    platform = Platform(tmp_path / "p")
    _m, files = validate_task_dir(task_dir)
    v1 = platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), author="t"))
    platform.CreateRelease(admin_pb2.CreateReleaseRequest(task="tuned", version=v1.version, config={"sigma": "0.4"}))
    files["main.py"] += b"\n# v2\n"
    v2 = platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), author="t"))
    r2 = platform.CreateRelease(admin_pb2.CreateReleaseRequest(task="tuned", version=v2.version))
    assert json.loads(r2.config_json)["sigma"] == 0.2
    back = platform.Rollback(admin_pb2.RollbackRequest(task="tuned"))
    assert back.version == v1.version and json.loads(back.config_json)["sigma"] == 0.4


def test_an_ab_test_with_the_cli_alone(task_dir, tmp_path):
    run = CliRunner()
    base = ["--data-dir", str(tmp_path / "data")]
    assert run.invoke(cli, base + ["task", "submit", str(task_dir)]).exit_code == 0
    a = run.invoke(cli, base + ["release", "create", "tuned"])
    b = run.invoke(cli, base + ["release", "create", "tuned", "--rollout", "50", "--set", "sigma=0.5"])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    arms = {}
    for i in range(40):
        out = run.invoke(cli, base + ["--json", "device", "preview", "--attrs", f"user_id=u{i},host_version=0.1.0"])
        task = json.loads(out.output)["tasks"][0]
        arms.setdefault(json.loads(task["config_json"])["sigma"], set()).add(task["release_id"])
    assert set(arms) == {0.2, 0.5} and all(len(ids) == 1 for ids in arms.values())  # one release per arm
    human = run.invoke(cli, base + ["device", "preview", "--attrs", "user_id=u1,host_version=0.1.0"]).output
    assert '  config {"K":5,"metric":"auc","sigma":' in human
