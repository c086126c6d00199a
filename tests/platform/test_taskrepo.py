"""The git-backed task repository, on a real git repository in tmp_path."""
import hashlib
import pathlib
import subprocess
import sys
import threading

import git
import pytest

from walle.platform.errors import InvalidArgument, NotFound
from walle.platform.manifest import ManifestError, TaskFolderError
from walle.platform.taskrepo import TaskRepository
from walle.protos import bundle

HELLO = pathlib.Path(__file__).resolve().parents[2] / "tasks" / "hello"


def task(name="hello", main=b"def main(event):\n    return 1\n", **extra):
    files = {"task.toml": f'name = "{name}"\nentry = "main.py"\napis = ["log"]\n'.encode(), "main.py": main}
    files.update(extra)
    return files


@pytest.fixture
def repo(tmp_path):
    r = TaskRepository(tmp_path / "store")
    yield r
    r.close()


def _state(r: TaskRepository):
    g = git.Repo(r.repo_dir)
    head = g.head.commit.hexsha
    count = int(g.git.rev_list("--count", "HEAD"))
    status = g.git.status("--porcelain", "--untracked-files=all")
    g.close()
    return head, count, status


def test_submit_history_diff_files(repo):
    v1 = repo.submit_files(task(**{"util.py": b"X = 1\n"}))
    assert v1.created and v1.message == "submit hello" and v1.author == "walle"
    assert len(v1.version) == 40 and v1.created_at > 1_600_000_000
    assert v1.bundle_digest.startswith("sha256:") and v1.bundle_size > 0
    v2 = repo.submit_files(task(main=b"def main(event):\n    return 2\n"), message="return two", author="alice")
    assert v2.version != v1.version and (v2.message, v2.author) == ("return two", "alice")

    assert [v.version for v in repo.history("hello")] == [v2.version, v1.version]
    assert repo.get("hello") == v2 and repo.get("hello", v1.version) == v1
    # The folder is replaced wholly: util.py was deleted in v2.
    assert repo.files("hello") == task(main=b"def main(event):\n    return 2\n")
    assert repo.files("hello", v1.version[:8]) == task(**{"util.py": b"X = 1\n"})

    d = repo.diff("hello", v1.version, v2.version)
    assert "-    return 1\n+    return 2\n" in d
    assert "--- a/util.py\n+++ /dev/null" in d
    assert "tasks/hello" not in d   # paths are relative to the task folder
    assert repo.diff("hello", v1.version, v1.version) == ""
    assert _state(repo)[2] == ""    # working tree clean after commits


def test_identical_resubmit_creates_no_version(repo, tmp_path):
    v1 = repo.submit_dir(HELLO)
    before = _state(repo)
    again = repo.submit_dir(HELLO, message="again")
    assert again.created is False and again.version == v1.version and again.message == v1.message
    assert _state(repo) == before
    # Litter such as __pycache__ does not count as a change.
    files = repo.files("hello")
    files["__pycache__/main.cpython-311.pyc"] = b"\0\1"
    assert repo.submit_files(files).created is False
    assert len(repo.history("hello")) == 1


def test_same_content_as_older_version_is_a_new_version_with_same_digest(repo):
    v1 = repo.submit_files(task())
    v2 = repo.submit_files(task(main=b"def main(event):\n    return 2\n"))
    v3 = repo.submit_files(task())
    assert v3.created and v3.version not in (v1.version, v2.version)
    assert v3.bundle_digest == v1.bundle_digest != v2.bundle_digest
    assert repo.bundle("hello", v3.version) == repo.bundle("hello", v1.version)


def test_resolve(repo):
    v1 = repo.submit_files(task())
    other = repo.submit_files(task(name="other"))
    assert repo.resolve("hello") == v1.version
    assert repo.resolve("hello", v1.version[:4]) == v1.version
    assert repo.resolve("hello", v1.version.upper()) == v1.version
    with pytest.raises(NotFound, match="unknown task 'nope'"):
        repo.resolve("nope")
    with pytest.raises(NotFound, match="unknown task 'nope'"):
        repo.history("nope")
    # A commit of another task is not a version of this one.
    with pytest.raises(NotFound, match=f"task 'hello' has no version '{other.version}'"):
        repo.resolve("hello", other.version)
    missing = next(p for p in ("0000", "ffff", "abcd") if not v1.version.startswith(p))
    with pytest.raises(NotFound, match=f"task 'hello' has no version '{missing}'"):
        repo.get("hello", missing)
    with pytest.raises(InvalidArgument, match="4 to 40 hex"):
        repo.resolve("hello", "abc")
    with pytest.raises(InvalidArgument, match="4 to 40 hex"):
        repo.resolve("hello", "zzzz")
    with pytest.raises(InvalidArgument, match="task name"):
        repo.resolve("../x")


def _forge_commit(g: git.Repo, tree: str, parent: str, prefix: str) -> str:
    """Write a commit whose id starts with `prefix` (a brute-forced nonce in the message)."""
    ident = "mallory <> 1700000000 +0000"
    for i in range(2_000_000):
        body = f"tree {tree}\nparent {parent}\nauthor {ident}\ncommitter {ident}\n\nnonce {i}\n".encode()
        sha = hashlib.sha1(b"commit %d\0" % len(body) + body).hexdigest()
        if sha.startswith(prefix):
            written = g.git.hash_object("-t", "commit", "-w", "--stdin", istream=_BytesStdin(body))
            assert written == sha
            return sha
    raise AssertionError("no nonce found")


class _BytesStdin:
    """Minimal file object GitPython can pass as stdin."""

    def __init__(self, data: bytes):
        import tempfile
        self.f = tempfile.TemporaryFile()
        self.f.write(data)
        self.f.seek(0)

    def fileno(self):
        return self.f.fileno()

    def read(self, *a):
        return self.f.read(*a)


def test_ambiguous_prefix(repo):
    v1 = repo.submit_files(task())
    v2 = repo.submit_files(task(main=b"def main(event):\n    return 2\n"))
    g = git.Repo(repo.repo_dir)
    # A version made outside the API (tree of v1 on top of v2) whose id shares v1's first 4 hex digits.
    forged = _forge_commit(g, g.commit(v1.version).tree.hexsha, v2.version, v1.version[:4])
    g.git.update_ref("refs/heads/main", forged, v2.version)
    g.close()
    with pytest.raises(InvalidArgument, match=f"version '{v1.version[:4]}' of task 'hello' is ambiguous"):
        repo.resolve("hello", v1.version[:4])
    n = next(i for i in range(4, 41) if v1.version[:i] != forged[:i]) + 1
    assert repo.resolve("hello", v1.version[:n]) == v1.version
    assert repo.resolve("hello", forged[:n]) == forged
    assert repo.get("hello").version == forged and repo.get("hello").author == "mallory"
    assert repo.get("hello").bundle_digest == v1.bundle_digest


@pytest.mark.parametrize("bad, error, message", [
    ({"task.toml": b'name = "hello"\nentry = "main.py"\n[limts]\n', "main.py": b""}, ManifestError,
     "unknown key 'limts'"),
    (task(main=b"def main(event:\n    return 1\n"), TaskFolderError, "main.py:1"),
    (task(**{"../evil.py": b"x = 1\n"}), TaskFolderError, "'../evil.py'"),
    (task(**{"big.bin": bytes(1024 * 1024 + 1)}), TaskFolderError, "'big.bin' is 1048577 bytes"),
])
def test_bad_submit_changes_nothing(repo, bad, error, message):
    v1 = repo.submit_files(task())
    before = _state(repo)
    with pytest.raises(error, match=message):
        repo.submit_files(bad)
    assert _state(repo) == before
    assert [v.version for v in repo.history("hello")] == [v1.version]
    assert repo.files("hello") == task()


def test_symlink_in_submitted_dir_changes_nothing(repo, tmp_path):
    repo.submit_files(task())
    before = _state(repo)
    folder = tmp_path / "t"
    folder.mkdir()
    for path, data in task(main=b"X = 3\ndef main(event):\n    return 3\n").items():
        (folder / path).write_bytes(data)
    (folder / "passwd.py").symlink_to("/etc/passwd")
    with pytest.raises(TaskFolderError, match="'passwd.py' is a symlink"):
        repo.submit_dir(folder)
    assert _state(repo) == before


def test_bad_author_changes_nothing(repo):
    before = _state(repo)
    with pytest.raises(InvalidArgument, match="author"):
        repo.submit_files(task(), author="evil <x@y>")
    assert _state(repo) == before
    with pytest.raises(NotFound):
        repo.get("hello")


def test_list_tasks_and_reopen(tmp_path):
    with TaskRepository(tmp_path / "s") as r:
        r.submit_files(task(name="zeta"))
        r.submit_files(task(name="alpha"))
        r.submit_files(task(name="alpha", main=b"def main(event):\n    return 9\n"))
        listed = [(v.name, v.version) for v in r.list_tasks()]
    with TaskRepository(tmp_path / "s") as again:
        assert [(v.name, v.version) for v in again.list_tasks()] == listed
        assert [n for n, _ in listed] == ["alpha", "zeta"]
        assert len(again.history("alpha")) == 2
        # A fresh process sees what another instance wrote after it opened.
        with TaskRepository(tmp_path / "s") as writer:
            v = writer.submit_files(task(name="zeta", main=b"def main(event):\n    return 7\n"))
        assert again.get("zeta").version == v.version


def test_bundle_determinism_across_repositories(tmp_path):
    with TaskRepository(tmp_path / "a") as a, TaskRepository(tmp_path / "b") as b:
        a.submit_files(task(name="noise"))           # different history in each repository
        va = a.submit_dir(HELLO, author="alice")
        vb = b.submit_dir(HELLO, author="bob", message="other message")
        assert va.version != vb.version
        da, ba = a.bundle("hello")
        db, bb = b.bundle("hello")
        assert (da, ba) == (db, bb) == (va.bundle_digest, ba)
        assert len(ba) == va.bundle_size
        assert bundle.unpack(ba, da) == a.files("hello")
        assert a.bundle_by_digest(da) == ba
        cache = tmp_path / "a" / "bundles" / "sha256" / da.removeprefix("sha256:")
        assert cache.read_bytes() == ba


def test_bundle_by_digest(tmp_path):
    with TaskRepository(tmp_path / "s") as r:
        digest, data = r.bundle(r.submit_files(task()).name)
        with pytest.raises(NotFound, match="unknown bundle"):
            r.bundle_by_digest("sha256:" + "0" * 64)
        with pytest.raises(InvalidArgument):
            r.bundle_by_digest("sha256:xyz")
    cache = tmp_path / "s" / "bundles" / "sha256" / digest.removeprefix("sha256:")
    corrupted = bytearray(data)
    corrupted[10] ^= 0xFF
    cache.write_bytes(bytes(corrupted))
    with TaskRepository(tmp_path / "s") as fresh:   # nothing in memory: must read, verify, and rebuild
        assert fresh.bundle_by_digest(digest) == data
    assert cache.read_bytes() == data
    cache.unlink()
    with TaskRepository(tmp_path / "s") as fresh:
        assert fresh.bundle_by_digest(digest) == data


def test_threads_submit_concurrently(repo):
    errors = []

    def submit(name):
        try:
            for i in range(3):
                repo.submit_files(task(name=name, main=f"def main(event):\n    return {i}\n".encode()))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=submit, args=(n,)) for n in ("left", "right")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [v.name for v in repo.list_tasks()] == ["left", "right"]
    for name in ("left", "right"):
        assert len(repo.history(name)) == 3
        assert repo.files(name)["main.py"].endswith(b"return 2\n")
    assert _state(repo)[1] == 1 + 6


WORKER = """
import sys
from walle.platform.taskrepo import TaskRepository
root, name = sys.argv[1], sys.argv[2]
with TaskRepository(root) as r:
    for i in range(4):
        files = {"task.toml": f'name = "{name}"\\nentry = "main.py"\\n'.encode(),
                 "main.py": f"def main(event):\\n    return {i}\\n".encode()}
        r.submit_files(files)
"""


def test_processes_submit_concurrently(tmp_path):
    root = tmp_path / "shared"
    TaskRepository(root).close()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(root), n], stderr=subprocess.PIPE)
             for n in ("proc-a", "proc-b")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    with TaskRepository(root) as r:
        assert [len(r.history(n)) for n in ("proc-a", "proc-b")] == [4, 4]
        assert _state(r)[1:] == (1 + 8, "")


def test_reopen_recovers_from_a_writer_that_died_mid_submit(tmp_path):
    root = tmp_path / "s"
    with TaskRepository(root) as r:
        v1 = r.submit_files(task())
    # What a crash between writing files and committing leaves behind.
    work = root / "repo" / "tasks" / "hello"
    (work / "main.py").write_bytes(b"half written")
    (work / "stray.py").write_bytes(b"x = 1\n")
    (root / "repo" / ".git" / "index.lock").write_bytes(b"")
    with TaskRepository(root) as r:
        assert _state(r)[2] == ""
        assert r.files("hello") == task()
        v2 = r.submit_files(task(main=b"def main(event):\n    return 5\n"))
        assert [v.version for v in r.history("hello")] == [v2.version, v1.version]
        assert r.files("hello") == task(main=b"def main(event):\n    return 5\n")
