"""Authoring: docs/tasks.md lists exactly the host API a device grants (checked against the op
table, so it cannot drift) and every manifest key; `walle task new` scaffolds a task that passes
submit; `walle task run` runs it in the real sandbox before any submit."""
import json
import pathlib
import re

import pytest
from click.testing import CliRunner

from walle.device_host.localrun import op_signatures
from walle.platform import manifest
from walle.platform.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "tasks.md").read_text()


def test_docs_list_every_host_api_op_with_its_signature():
    documented = dict(re.findall(r"^#### `([a-z]+\.[a-z_]+)(\(.*\))`$", DOC, flags=re.M))
    assert documented == op_signatures()
    # every op's group is a manifest API name, and each group has its own section
    # `config` is given to every task (no manifest API grants it)
    assert {op.split(".")[0] for op in documented} == set(manifest.APIS) | {"config"}
    for group in manifest.APIS:
        assert re.search(rf"^### {group}$", DOC, flags=re.M), group


def test_docs_cover_every_manifest_key_and_trigger_kind():
    for key in manifest._TOP_KEYS:
        assert f"`{key}`" in DOC or f"`[{key}]`" in DOC or f"`[[{key}]]`" in DOC, key
    for key in manifest._LIMIT_KEYS:
        assert f"| `{key}` |" in DOC, key
    for kind, keys in manifest.TRIGGER_KINDS.items():
        row = next(line for line in DOC.splitlines() if line.startswith(f"| `{kind}` |"))
        assert all(f"`{k}`" in row for k in keys), (kind, row)


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("WALLE_CONFIG", str(tmp_path / "none.toml"))

    def run(*args, code=0):
        res = CliRunner().invoke(main, ["--data-dir", str(tmp_path / "platform"), *args])
        assert res.exit_code == code, (args, res.output)
        return res
    return run


def test_new_task_runs_locally_in_the_sandbox_then_submits(cli, tmp_path):
    out = json.loads(cli("--json", "task", "new", "counter", "--dir", str(tmp_path)).output)
    folder = pathlib.Path(out["folder"])
    assert out["files"] == ["main.py", "storage.json", "task.toml"]
    cli("task", "new", "counter", "--dir", str(tmp_path), code=4)

    # the event the app_open trigger passes, storage seeded from the scaffold's storage.json
    res = json.loads(cli("--json", "task", "run", str(folder), "--event", 'app_open={"screen": "home"}',
                         "--storage-from", str(folder / "storage.json")).output)
    assert res["status"] == "ok" and res["value"] == {"opens": 42, "screen": "home"}
    assert res["event"]["name"] == "app_open" and res["event"]["payload"] == {"screen": "home"}
    assert res["storage_tables"] == {"opens": 2} and res["warnings"] == []
    assert res["peak_memory_kb"] > 0 and res["duration_s"] > 0

    # a schedule run gets the schedule event, and its log line is printed
    sched = cli("task", "run", str(folder), "--event", "schedule").output
    assert '{"name": "schedule", "every_seconds": 60.0}' in sched and "| info: 0 app opens so far" in sched

    # storage kept across runs with --storage
    keep = tmp_path / "keep.sqlite3"
    for n in (1, 2):
        res = json.loads(cli("--json", "task", "run", str(folder), "--event", "app_open", "--storage",
                             str(keep)).output)
        assert res["value"]["opens"] == n

    # an event no trigger listens to: still runs, with a warning
    res = json.loads(cli("--json", "task", "run", str(folder), "--event", "nosuch").output)
    assert "never run" in res["warnings"][0]

    # what submit refuses, task run refuses too (exit 2, naming file and line)
    (folder / "main.py").write_text('from walle import log\n\n\ndef main(event):\n    log.info("start")\n'
                                    '    import os\n')
    bad = cli("task", "run", str(folder), "--event", "app_open", code=2).output
    assert "main.py:6: module 'os' is not available in the sandbox" in bad
    # a version that fails when it runs: exit 1, its log line, the task's own traceback
    (folder / "main.py").write_text('from walle import log\n\n\ndef main(event):\n    log.info("start")\n'
                                    '    return event["payload"]["name"]\n')
    bad = cli("task", "run", str(folder), "--event", "app_open", code=1).output
    assert "| info: start" in bad and "! KeyError: 'name'" in bad
    assert '!   File "main.py", line 6, in main' in bad

    # the scaffold (restored) passes submit
    (folder / "main.py").unlink()
    folder.rename(tmp_path / "old")
    folder = pathlib.Path(json.loads(cli("--json", "task", "new", "counter", "--dir", str(tmp_path / "fresh"))
                                     .output)["folder"])
    tv = json.loads(cli("--json", "task", "submit", str(folder), "-m", "first").output)
    assert tv["name"] == "counter" and tv["created"] is True
    cli("task", "new", "Bad Name", code=2)
    cli("task", "run", str(folder), "--event", "x={not json", code=2)
