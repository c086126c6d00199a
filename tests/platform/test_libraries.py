"""Task libraries: tasks/_lib/<name>/ is copied into each bundle that declares it, shown, diffed and
imported inside the real sandbox under the same policy as the entry script."""
from __future__ import annotations

import json
import pathlib

import pytest
from click.testing import CliRunner

from walle.platform.cli import main as cli
from walle.platform.errors import InvalidArgument
from walle.platform.manifest import (LIB_DIR, ManifestError, TaskFolderError, validate_task_dir,
                                     validate_task_files)
from walle.platform.taskrepo import TaskRepository

TASK_TOML = """name = "greeter"
entry = "main.py"
apis = ["log"]
libraries = ["greet"]
"""
MAIN = """import greet
from greet import words
from greet.words import shout


def main(event):
    who = event.get("who", "world")
    return {"text": greet.hello(who), "loud": shout(who), "n": len(words.WORDS)}
"""
LIB_INIT = """from .words import WORDS, shout
from . import words
import textkit


def hello(who):
    return textkit.join([WORDS[0], who])
"""
LIB_WORDS = """WORDS = ("hello", "hi")


def shout(text):
    return text.upper() + "!"
"""


def write(root: pathlib.Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def tasks(tmp_path) -> pathlib.Path:
    """A tasks folder: the greeter task, library greet (needing library textkit) and textkit."""
    root = tmp_path / "tasks"
    write(root, {"greeter/task.toml": TASK_TOML, "greeter/main.py": MAIN,
                 f"{LIB_DIR}/greet/__init__.py": LIB_INIT, f"{LIB_DIR}/greet/words.py": LIB_WORDS,
                 f"{LIB_DIR}/greet/library.toml": 'description = "greetings"\nlibraries = ["textkit"]\n',
                 f"{LIB_DIR}/textkit/__init__.py": "def join(parts):\n    return ' '.join(parts)\n"})
    return root


def test_submit_resolves_libraries_into_the_bundle(tasks):
    manifest, files = validate_task_dir(tasks / "greeter")
    assert manifest.libraries == ("greet",)
    assert sorted(files) == ["_lib/greet/__init__.py", "_lib/greet/library.toml", "_lib/greet/words.py",
                             "_lib/textkit/__init__.py", "main.py", "task.toml"]
    assert files["_lib/greet/words.py"] == LIB_WORDS.encode()


def test_cli_submit_show_diff_with_a_library_change(tasks, tmp_path):
    run = CliRunner()
    base = ["--data-dir", str(tmp_path / "data")]
    v1 = json.loads(run.invoke(cli, base + ["--json", "task", "submit", str(tasks / "greeter")]).output)
    assert v1["manifest"]["libraries"] == ["greet"]
    shown = json.loads(run.invoke(cli, base + ["--json", "task", "show", "greeter"]).output)
    assert shown["files"]["_lib/greet/words.py"] == LIB_WORDS
    assert shown["digests"]["_lib/greet/words.py"].startswith("sha256:")
    human = run.invoke(cli, base + ["task", "show", "greeter"]).output
    assert "libraries: greet" in human and f"{shown['digests']['_lib/textkit/__init__.py']}  _lib/textkit/__init__.py" in human

    # Only the library changes: the task gets a new version, a new bundle, and the diff shows the library.
    (tasks / LIB_DIR / "textkit" / "__init__.py").write_text("def join(parts):\n    return '-'.join(parts)\n")
    v2 = json.loads(run.invoke(cli, base + ["--json", "task", "submit", str(tasks / "greeter")]).output)
    assert v2["created"] and v2["version"] != v1["version"] and v2["bundle_digest"] != v1["bundle_digest"]
    diff = run.invoke(cli, base + ["task", "diff", "greeter", v1["version"], v2["version"]]).output
    assert "_lib/textkit/__init__.py" in diff and "+    return '-'.join(parts)" in diff and "main.py" not in diff
    same = json.loads(run.invoke(cli, base + ["--json", "task", "submit", str(tasks / "greeter")]).output)
    assert not same.get("created") and same["version"] == v2["version"]  # nothing changed: no new version


def test_library_code_runs_in_the_real_sandbox(tasks, tmp_path):
    from walle.device_host.sandbox import Sandbox
    with TaskRepository(tmp_path / "repo") as repo:
        tv = repo.submit_dir(tasks / "greeter")
        files = {p: d.decode() for p, d in repo.files("greeter", tv.version).items() if p.endswith(".py")}
    with Sandbox() as sb:
        res = sb.run(files, "main.py", {"who": "ann"})
        assert res.status == "ok", res.error
        assert res.value == {"text": "hello ann", "loud": "ANN!", "n": 2}
        # Library modules run under the same policy as the entry script.
        evil = dict(files, **{"_lib/textkit/__init__.py": "def join(parts):\n    return ().__class__\n"})
        res = sb.run(evil, "main.py", {})
        assert res.status == "error" and "__class__" in res.error
        # _lib is not importable by its folder name; libraries are imported by their own name only.
        res = sb.run(dict(files, **{"main.py": "import _lib.greet\ndef main(event):\n    return 1\n"}), "main.py", {})
        assert res.status == "error" and "_lib" in res.error


@pytest.mark.parametrize("libraries, error", [
    ('["../secrets"]', "escapes the tasks folder"),
    ('["/etc"]', "escapes the tasks folder"),
    ('["Greet"]', "must be a library name"),
    ('["greet", "greet"]', "twice"),
    ('["numpy"]', "the name of a module the sandbox provides"),
    ('["nosuch"]', "unknown library 'nosuch' (needed by task.toml)"),
])
def test_bad_library_declarations_are_refused(tasks, libraries, error):
    toml = tasks / "greeter" / "task.toml"
    toml.write_text(TASK_TOML.replace('["greet"]', libraries))
    with pytest.raises(InvalidArgument) as e:
        validate_task_dir(tasks / "greeter")
    assert error in e.value.message


def test_library_cycles_unknown_dependencies_and_symlinks_are_refused(tasks, tmp_path):
    (tasks / LIB_DIR / "textkit" / "library.toml").write_text('libraries = ["greet"]\n')
    with pytest.raises(TaskFolderError, match="library cycle: greet -> textkit -> greet"):
        validate_task_dir(tasks / "greeter")
    (tasks / LIB_DIR / "textkit" / "library.toml").write_text('libraries = ["missing"]\n')
    with pytest.raises(TaskFolderError, match="unknown library 'missing' \\(needed by library 'textkit'\\)"):
        validate_task_dir(tasks / "greeter")
    (tasks / LIB_DIR / "textkit" / "library.toml").unlink()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "__init__.py").write_text("SECRET = 1\n")
    (tasks / LIB_DIR / "evil").symlink_to(outside)
    (tasks / "greeter" / "task.toml").write_text(TASK_TOML.replace('["greet"]', '["greet", "evil"]'))
    with pytest.raises(TaskFolderError, match="symlink"):
        validate_task_dir(tasks / "greeter")


def test_oversize_library_is_refused(tasks):
    big = tasks / LIB_DIR / "textkit"
    for i in range(9):
        (big / f"blob{i}.py").write_text("X = 1\n" + "#" * (1024 * 1024 - 10) + "\n")
    with pytest.raises(TaskFolderError, match="library 'textkit'|libraries included"):
        validate_task_dir(tasks / "greeter")


def test_bundled_library_part_is_checked_on_the_platform(tasks):
    _m, files = validate_task_dir(tasks / "greeter")
    cases = [
        ({k: v for k, v in files.items() if not k.startswith("_lib/textkit/")}, "unknown library 'textkit'"),
        (dict(files, **{"_lib/extra/__init__.py": b""}), "does not declare it"),
        (dict(files, **{"_lib/stray.py": b""}), "holds only library folders"),
        ({k: v for k, v in files.items() if k != "_lib/greet/__init__.py"}, "has no __init__.py"),
        (dict(files, **{"greet.py": b"X = 1\n"}), "would be ambiguous"),
        (dict(files, **{"_lib/greet/bad.py": b"def f(:\n"}), "_lib/greet/bad.py:1"),
    ]
    for bad, error in cases:
        with pytest.raises(InvalidArgument) as e:
            validate_task_files(bad)
        assert error in e.value.message, (error, e.value.message)
    with pytest.raises(ManifestError, match="library.toml"):
        validate_task_files(dict(files, **{"_lib/greet/library.toml": b"libraries = 3\n"}))


def test_task_folder_may_not_hold_its_own_lib(tasks):
    write(tasks, {"greeter/_lib/greet/__init__.py": ""})
    with pytest.raises(TaskFolderError, match="has its own _lib/"):
        validate_task_dir(tasks / "greeter")
