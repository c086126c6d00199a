"""task.toml parsing and task folder validation: strict, with errors that name the field or the file."""
import os
import pathlib

import pytest

from walle.platform.errors import InvalidArgument
from walle.platform.manifest import (Limits, Manifest, ManifestError, TaskFolderError, Trigger, parse_manifest,
                                     validate_task_dir, validate_task_files)
from walle.protos import device_pb2

HELLO = pathlib.Path(__file__).resolve().parents[2] / "tasks" / "hello"

FULL = """
name = "ranker"
entry = "src/main.py"
description = "Re-ranks the feed"
apis = ["storage", "model", "events"]
min_host_version = "0.2.1"
[limits]
memory_mb = 512
cpu_seconds = 20
wall_seconds = 5.5
[[triggers]]
kind = "event"
event = "page_view:home"
[[triggers]]
kind = "table_rows"
table = "clicks"
min_rows = 50
[[triggers]]
kind = "schedule"
every_seconds = 3600
"""

MINIMAL = 'name = "m"\nentry = "main.py"\n'


def test_hello_example_validates():
    manifest, files = validate_task_dir(HELLO)
    assert manifest.name == "hello" and manifest.entry == "main.py"
    assert set(manifest.apis) == {"log", "storage"}
    assert Trigger(kind="event", event="hello") in manifest.triggers
    assert {"task.toml", "main.py"} <= set(files)
    assert b"def main(event)" in files["main.py"]


def test_full_manifest():
    m = parse_manifest(FULL)
    assert m.name == "ranker" and m.entry == "src/main.py" and m.description == "Re-ranks the feed"
    assert m.apis == ("storage", "model", "events") and m.min_host_version == "0.2.1"
    # wall_seconds below cpu_seconds is allowed (they bound different things).
    assert m.limits == Limits(memory_mb=512, cpu_seconds=20.0, wall_seconds=5.5)
    assert m.triggers == (Trigger("event", event="page_view:home"), Trigger("table_rows", table="clicks", min_rows=50),
                          Trigger("schedule", every_seconds=3600.0))


def test_defaults():
    m = parse_manifest(MINIMAL)
    assert m == Manifest(name="m", entry="main.py")
    assert m.limits == Limits(memory_mb=256, cpu_seconds=10.0, wall_seconds=30.0)
    assert m.apis == () and m.triggers == () and m.description == "" and m.min_host_version == ""


def test_proto_and_toml_round_trip():
    m = parse_manifest(FULL)
    pb = m.to_proto()
    assert isinstance(pb, device_pb2.TaskManifest)
    assert pb.limits.memory_mb == 512 and pb.triggers[1].min_rows == 50 and list(pb.apis) == list(m.apis)
    again = device_pb2.TaskManifest.FromString(pb.SerializeToString())
    assert Manifest.from_proto(again) == m
    assert parse_manifest(m.to_toml()) == m
    odd = Manifest(name="q", entry="main.py", description='quote " back\\slash\nnew\tline \x7f \u00e9')
    assert parse_manifest(odd.to_toml()) == odd


def test_from_proto_validates():
    pb = parse_manifest(FULL).to_proto()
    pb.limits.memory_mb = 0
    with pytest.raises(ManifestError, match="limits.memory_mb"):
        Manifest.from_proto(pb)


@pytest.mark.parametrize("text, message", [
    (MINIMAL + "[limits]\nmemory_mb = 0\n",
     "task.toml: limits.memory_mb must be an integer between 16 and 4096 (got 0)"),
    (MINIMAL + "[limts]\nmemory_mb = 64\n", "task.toml: unknown key 'limts' (did you mean 'limits'?)"),
    (MINIMAL + "[limits]\nmemry_mb = 64\n", "task.toml: unknown key 'limits.memry_mb' (did you mean 'limits.memory_mb'?)"),
    (MINIMAL + "[limits]\nmemory_mb = true\n", "limits.memory_mb must be an integer between 16 and 4096 (got True)"),
    (MINIMAL + "[limits]\nmemory_mb = 64.0\n", "limits.memory_mb must be an integer"),
    (MINIMAL + "[limits]\ncpu_seconds = 0\n", "limits.cpu_seconds must be a number above 0 and at most 3600 (got 0)"),
    (MINIMAL + "[limits]\ncpu_seconds = nan\n", "limits.cpu_seconds must be a number"),
    (MINIMAL + "[limits]\nwall_seconds = 7201\n", "limits.wall_seconds must be a number above 0 and at most 7200"),
    ('entry = "main.py"\n', "task.toml: name is required"),
    ('name = "Hello"\nentry = "main.py"\n', "name must be a lowercase letter"),
    ('name = "h"\n', "task.toml: entry is required"),
    ('name = "h"\nentry = "main.txt"\n', "entry must be the relative path of a .py file"),
    ('name = "h"\nentry = "../main.py"\n', "contains '..'"),
    ('name = "h"\nentry = "/abs/main.py"\n', "absolute"),
    (MINIMAL + 'apis = ["log", "db"]\n', "apis[1] must be one of storage, model, tunnel, events, log (got 'db')"),
    (MINIMAL + 'apis = ["log", "log"]\n', "apis lists 'log' twice"),
    (MINIMAL + 'apis = "log"\n', "apis must be a list"),
    (MINIMAL + 'min_host_version = "latest"\n', "min_host_version must be a version"),
    (MINIMAL + 'colour = "red"\n', "unknown key 'colour'"),
    (MINIMAL + '[[triggers]]\nkind = "event"\n', "triggers[0].event is required"),
    (MINIMAL + '[[triggers]]\nkind = "cron"\n', "triggers[0].kind must be one of event, table_rows, schedule"),
    (MINIMAL + '[[triggers]]\nevent = "x"\n', "triggers[0].kind is required"),
    (MINIMAL + '[[triggers]]\nkind = "event"\nevnt = "x"\n', "unknown key 'triggers[0].evnt' (did you mean 'triggers[0].event'?)"),
    (MINIMAL + '[[triggers]]\nkind = "event"\nevent = "x"\ntable = "t"\n', "triggers[0].table is not allowed for kind 'event'"),
    (MINIMAL + '[[triggers]]\nkind = "event"\nevent = "has space"\n', "triggers[0].event must be an event name"),
    (MINIMAL + '[[triggers]]\nkind = "table_rows"\ntable = "t"\nmin_rows = 0\n', "triggers[0].min_rows must be an integer between 1"),
    (MINIMAL + '[[triggers]]\nkind = "table_rows"\ntable = "t"\n', "triggers[0].min_rows is required"),
    (MINIMAL + '[[triggers]]\nkind = "schedule"\nevery_seconds = 0.5\n', "triggers[0].every_seconds must be a number between 1"),
    (MINIMAL + '[[triggers]]\nkind = "schedule"\nevery_seconds = 5\n[[triggers]]\nkind = "schedule"\nevery_seconds = 5\n',
     "triggers[1] duplicates triggers[0]"),
    (MINIMAL + 'triggers = "x"\n', "triggers must be an array of tables"),
])
def test_manifest_errors(text, message):
    with pytest.raises(ManifestError) as info:
        parse_manifest(text)
    assert message in str(info.value)
    assert isinstance(info.value, InvalidArgument)


def test_toml_syntax_error_has_line_and_column():
    with pytest.raises(ManifestError, match=r"task.toml: invalid TOML: .*line 2, column \d+"):
        parse_manifest('name = "x"\nentry = \n')


# --- task folders -------------------------------------------------------------------------------

def _files(**extra):
    files = {"task.toml": MINIMAL.encode(), "main.py": b"def main(event):\n    return {}\n"}
    files.update({k.replace("__", "/"): v for k, v in extra.items()})
    return files


def test_files_ok():
    assert validate_task_files(_files(lib__util=b"")).name == "m"


@pytest.mark.parametrize("files, message", [
    ({"main.py": b""}, "task folder has no task.toml"),
    ({"task.toml": MINIMAL.encode()}, "task entry 'main.py' (from task.toml) is not in the task folder"),
    ({"task.toml": b"\xff\xfe", "main.py": b""}, "task.toml: not valid UTF-8"),
    (_files(**{"lib/bad.py": b"x = 1\ndef f(:\n"}), "lib/bad.py:2: "),
    (_files(**{"main.py": b"a = 1\0\n"}), "main.py"),
    (_files(**{"../evil.py": b""}), "task file '../evil.py': path contains '..'"),
    (_files(**{"/etc/x": b""}), "task file '/etc/x': path is absolute"),
    (_files(**{"sub/.gitattributes": b"* filter=x"}), "reserved"),
    (_files(**{".git": b"gitdir: /x"}), "reserved"),
    (_files(**{"big.bin": bytes(1024 * 1024 + 1)}), "task file 'big.bin' is 1048577 bytes; at most 1048576"),
    (_files(**{f"f{i}.txt": bytes(1024 * 1024) for i in range(9)}), "task files total"),
    (_files(**{f"f{i}.txt": b"" for i in range(199)}), "task folder has 201 files; at most 200"),
    (_files(**{"lib": b"", "lib/x.py": b""}), "task file 'lib' is both a file and a folder"),
    (_files(**{"main.py": "x"}), "content must be bytes"),
])
def test_file_errors(files, message):
    with pytest.raises(InvalidArgument) as info:
        validate_task_files(files)
    assert message in str(info.value)


def _write(root, files):
    for path, data in files.items():
        p = root / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def test_dir_skips_litter(tmp_path):
    _write(tmp_path, _files())
    _write(tmp_path, {"__pycache__/main.cpython-311.pyc": b"\0", "lib/x.pyc": b"\0", ".DS_Store": b"\0",
                      ".git/config": b"[core]", "lib/ok.py": b"Y = 1\n"})
    manifest, files = validate_task_dir(tmp_path)
    assert manifest.name == "m"
    assert set(files) == {"task.toml", "main.py", "lib/ok.py"}


def test_dir_refuses_symlink(tmp_path):
    _write(tmp_path, _files())
    (tmp_path / "link.py").symlink_to(tmp_path / "main.py")
    with pytest.raises(TaskFolderError, match="'link.py' is a symlink"):
        validate_task_dir(tmp_path)


def test_dir_refuses_symlinked_folder(tmp_path):
    _write(tmp_path / "t", _files())
    (tmp_path / "other").mkdir()
    (tmp_path / "t" / "sub").symlink_to(tmp_path / "other")
    with pytest.raises(TaskFolderError, match="'sub' is a symlink"):
        validate_task_dir(tmp_path / "t")


def test_dir_refuses_special_file(tmp_path):
    _write(tmp_path, _files())
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(TaskFolderError, match="'pipe' is a special file"):
        validate_task_dir(tmp_path)


def test_dir_refuses_oversized_file(tmp_path):
    _write(tmp_path, _files(**{"data/big.bin": bytes(1024 * 1024 + 1)}))
    with pytest.raises(TaskFolderError, match="'data/big.bin' is 1048577 bytes"):
        validate_task_dir(tmp_path)


def test_dir_missing(tmp_path):
    with pytest.raises(TaskFolderError, match="does not exist"):
        validate_task_dir(tmp_path / "nope")


def test_namespace_is_optional_validated_and_round_trips():
    from walle.platform.manifest import Manifest, ManifestError, parse_manifest
    base = 'name = "coda-filter"\nentry = "main.py"\n'
    m = parse_manifest(base)
    assert m.namespace == "" and m.storage_namespace == "coda_filter"
    m = parse_manifest(base + 'namespace = "coda"\n')
    assert m.storage_namespace == "coda"
    assert Manifest.from_proto(m.to_proto()) == m and parse_manifest(m.to_toml()) == m
    for bad in ("Coda", "co__da", "1coda", "co-da", "../x"):
        with pytest.raises(ManifestError, match="namespace"):
            parse_manifest(base + f'namespace = "{bad}"\n')
