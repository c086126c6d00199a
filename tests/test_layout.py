"""The repository layout must never shadow the standard library, and generated code must be fresh."""
import pathlib
import subprocess
import sys
import sysconfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_platform_is_stdlib_when_run_from_repo_root():
    # The current folder comes first on sys.path for `python -c`; a root platform/__init__.py would win.
    out = subprocess.run([sys.executable, "-c", "import platform, walle.platform.errors as e; "
                          "print(platform.__file__); print(platform.python_version()); print(e.__name__)"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert pathlib.Path(out[0]).resolve().parent == stdlib
    assert out[1] == ".".join(map(str, sys.version_info[:3]))
    assert out[2] == "walle.platform.errors"


def test_no_package_marker_at_mapped_roots():
    for folder in ("platform", "device_host", "protos", "tasks"):
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py would shadow or break the walle namespace"
    assert not (ROOT / "walle").exists(), "a root walle/ folder would shadow the installed namespace package"


def test_numpy_and_git_import_from_repo_root():
    # numpy, GitPython, faiss and MNN import `platform`; they must keep working from the root.
    subprocess.run([sys.executable, "-c", "import numpy, git, faiss; import walle.protos.device_pb2"],
                   cwd=ROOT, check=True, capture_output=True)


def test_generated_protobuf_code_is_fresh():
    res = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
