"""Git-backed task repository: every submitted task version is a commit, every bundle is content-addressed.

Layout under `root`:
  repo/                      a normal (non-bare) git repository; task <name> lives at tasks/<name>/
  bundles/sha256/<hex>       deterministic bundles, named by the sha256 of their bytes
  .lock                      fcntl lock serialising writers across processes

A version is the full id of a commit that changed tasks/<name>. Commits never change, so whatever is
derived from one (files, manifest, bundle digest) is cached in memory for good; only "which commit is
latest" depends on HEAD and is refreshed incrementally when HEAD moves.
"""
from __future__ import annotations

import collections
import dataclasses
import fcntl
import os
import re
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import git

from walle.platform.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, WalleError
from walle.platform.files import write_atomic
from walle.platform.manifest import (NAME_RE, Manifest, load_task_dir, strip_ignored,
                                     validate_task_files)
from walle.protos import bundle as _bundle
from walle.protos.namespaces import sharing_problem

_HEX_RE = re.compile(r"^[0-9a-f]{4,40}$")
_AUTHOR_RE = re.compile(r"^[A-Za-z0-9_@+-]([A-Za-z0-9 _@.:+-]{0,98}[A-Za-z0-9_@+-])?$")
_BRANCH = "main"
_BUNDLE_MEMORY_CAP = 64 * 1024 * 1024
_FILES_MEMORY_CAP = 64 * 1024 * 1024
# Our git must not depend on whoever runs it: no global/system config (hooks, signing, autocrlf).
_GIT_ENV = {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0"}


class SubmitJournal(Protocol):
    """Durable record of submits in flight (the platform's state database): an intent is written
    before the git commit and confirmed, with the audit entry, after it. A submit is acknowledged
    only once confirmed; an intent left by a writer that died settles on the next open or submit."""

    def begin(self, task: str, parent: str, actor: str) -> int: ...
    def confirm(self, intent: int, tv: "TaskVersion") -> None: ...
    def rolled_back(self, intent: int, task: str, sha: str) -> None: ...
    def recovered(self, intent: int, task: str, parent: str) -> None: ...
    def pending(self) -> list[dict]: ...


@dataclass(frozen=True)
class TaskVersion:
    name: str
    version: str               # full 40-hex commit id
    message: str
    author: str
    created_at: int            # unix seconds (author time)
    bundle_digest: str         # "sha256:<hex>"
    bundle_size: int
    manifest: Manifest
    created: bool = True       # False when a submit found identical content and made no commit


class _ByteLRU:
    """Least-recently-used map bounded by the total size of its byte values."""

    def __init__(self, cap: int):
        self.cap, self.size = cap, 0
        self.items: collections.OrderedDict = collections.OrderedDict()
        self.lock = threading.Lock()   # own lock: hot-path readers skip the repository lock

    def get(self, key):
        with self.lock:
            item = self.items.get(key)
            if item is None:
                return None
            self.items.move_to_end(key)
            return item[0]

    def put(self, key, value, size: int) -> None:
        with self.lock:
            if key in self.items or size > self.cap:
                return
            self.items[key] = (value, size)
            self.size += size
            while self.size > self.cap:
                _, (_, s) = self.items.popitem(last=False)
                self.size -= s


class TaskRepository:
    """Versioned task store. Thread-safe, and safe for several processes sharing one `root`."""

    def __init__(self, root: str | os.PathLike, journal: "SubmitJournal | None" = None):
        self.root = Path(root)
        self.repo_dir = self.root / "repo"
        self.bundle_dir = self.root / "bundles" / "sha256"
        self.root.mkdir(parents=True, exist_ok=True)
        self.bundle_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        # Immutable per-commit facts.
        self._versions: dict[tuple[str, str], TaskVersion] = {}
        self._files = _ByteLRU(_FILES_MEMORY_CAP)
        self._bundles = _ByteLRU(_BUNDLE_MEMORY_CAP)
        self._digest_source: dict[str, tuple[str, str]] = {}   # digest -> (name, commit) that produced it
        # HEAD-dependent: commits touching each task, newest first, as of self._index_head.
        self._index_head: str | None = None
        self._index: dict[str, list[str]] = {}
        self.journal = journal
        with self._lock, self._file_lock():
            self._repo = self._open_or_init()
            self._recover_submits()

    # --- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._repo is not None:
                self._repo.close()
                self._repo = None
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    def __enter__(self) -> "TaskRepository":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _open_or_init(self) -> git.Repo:
        if (self.repo_dir / ".git").is_dir():
            repo = git.Repo(self.repo_dir)
            repo.git.update_environment(**_GIT_ENV)
            self._recover(repo)
            return repo
        self.repo_dir.mkdir(parents=True, exist_ok=True)
        repo = git.Repo.init(self.repo_dir, initial_branch=_BRANCH)
        repo.git.update_environment(**_GIT_ENV)
        with repo.config_writer() as cw:   # repository-local identity and byte-exact storage
            cw.set_value("user", "name", "walle")
            cw.set_value("user", "email", "walle@localhost")
            cw.set_value("core", "autocrlf", "false")
            cw.set_value("commit", "gpgsign", "false")
        # An initial empty commit gives every later commit a parent, so history and diffs just work.
        repo.git.commit("--allow-empty", "--no-verify", "-q", "-m", "init task repository")
        return repo

    def _recover(self, repo: git.Repo) -> None:
        """Undo a writer that died mid-submit (we hold the file lock, so no writer is running now)."""
        lock = self.repo_dir / ".git" / "index.lock"
        if lock.exists():
            lock.unlink()
        if repo.is_dirty(untracked_files=True):
            repo.git.reset("-q", "--hard", "HEAD")
            repo.git.clean("-q", "-f", "-d", "-x", "--", "tasks")

    # --- writing --------------------------------------------------------------------------------

    def submit_dir(self, path: str | os.PathLike, message: str | None = None, author: str = "walle") -> TaskVersion:
        """Submit the task folder at `path` with its libraries (see load_task_dir and submit_files)."""
        return self.submit_files(load_task_dir(path), message=message, author=author)

    def submit_files(self, files: dict[str, bytes], message: str | None = None,
                     author: str = "walle") -> TaskVersion:
        """Validate and commit a task's files as its new version; the task folder is replaced wholly.

        Identical content to the latest version makes no commit and returns that version with created=False.
        Nothing is written when validation fails.
        """
        if not isinstance(files, dict):
            raise InvalidArgument(f"task files must be a dict of path -> bytes (got {type(files).__name__})")
        files = strip_ignored(files)
        manifest = validate_task_files(files)
        name = manifest.name
        if not isinstance(author, str) or not _AUTHOR_RE.match(author):
            raise InvalidArgument(f"author must be 1-100 letters, digits, spaces or _ @ . : + - "
                                  f"(got {author!r})")
        message = (message or "").strip() or f"submit {name}"
        if "\x00" in message or len(message) > 10_000:
            raise InvalidArgument("message must be at most 10000 characters with no NUL")

        with self._lock, self._file_lock():
            self._refresh_index()
            self._recover_submits()
            # Storage is shared only where granted: refused if it would share a namespace uninvited.
            problem = sharing_problem(manifest, (self._version(n, s[0]).manifest
                                                 for n, s in self._index.items() if n != name and s))
            if problem:
                raise PermissionDenied(f"cannot submit {name}: {problem}")
            shas = self._index.get(name)
            if shas and self._commit_files(name, shas[0]) == files:
                return dataclasses.replace(self._version(name, shas[0]), created=False)
            parent = self._head_sha()
            intent = self.journal.begin(name, parent, author) if self.journal else None
            try:
                sha = self._commit(name, files, message, author)
            except BaseException:
                if intent is not None:
                    self.journal.rolled_back(intent, name, "")  # nothing was committed
                raise
            try:
                self._files.put((name, sha), files, sum(len(d) for d in files.values()))
                self._refresh_index()
                tv = self._version(name, sha)
                if intent is not None:
                    self.journal.confirm(intent, tv)  # the audit entry: from now on the version exists
            except BaseException:
                # Not acknowledged, so it must not stay a version: take the commit back.
                self._undo_commit(sha, parent)
                if intent is not None:
                    try:
                        self.journal.rolled_back(intent, name, sha)
                    except Exception:
                        pass  # the intent stays; the next open or submit finds the commit gone
                raise
            return tv

    def _undo_commit(self, sha: str, parent: str) -> None:
        """Move the branch back from `sha` to its parent (we hold the file lock: nothing is on top)."""
        if self._head_sha() == sha:
            self._repo.git.update_ref(f"refs/heads/{_BRANCH}", parent, sha)
            self._repo.git.reset("-q", "--hard", parent)
        self._index_head = None  # rebuild the per-task index from the new HEAD
        self._refresh_index()

    def _recover_submits(self) -> None:
        """Settle the intents of submits that died before their confirmation (caller holds the locks):
        a commit that was made is taken back; the operator never got an acknowledgement for it."""
        if self.journal is None:
            return
        for intent in self.journal.pending():
            head = self._head_sha()
            if head != intent["parent"] and self._repo.commit(head).parents[:1] and \
                    self._repo.commit(head).parents[0].hexsha == intent["parent"]:
                self._undo_commit(head, intent["parent"])
                self.journal.rolled_back(intent["id"], intent["task"], head)
            elif head == intent["parent"]:
                self.journal.rolled_back(intent["id"], intent["task"], "")
            else:  # history moved on past it (not by us): keep the version, but on the record
                self.journal.recovered(intent["id"], intent["task"], intent["parent"])

    def pending_version(self, name: str, sha: str) -> bool:
        """True while `sha` is a commit of a submit not yet confirmed (it is not releasable)."""
        if self.journal is None:
            return False
        parents = {i["parent"] for i in self.journal.pending() if i["task"] == name}
        if not parents:
            return False
        with self._lock:
            commit = self._repo.commit(sha)
            return bool(commit.parents) and commit.parents[0].hexsha in parents

    def _commit(self, name: str, files: dict[str, bytes], message: str, author: str) -> str:
        repo = self._repo
        rel = f"tasks/{name}"
        folder = self.repo_dir / "tasks" / name
        lock = self.repo_dir / ".git" / "index.lock"
        if lock.exists():   # left by a crashed writer; we hold the file lock
            lock.unlink()
        try:
            if folder.is_symlink() or folder.is_file():
                folder.unlink()
            elif folder.exists():
                shutil.rmtree(folder)
            for path, data in files.items():
                target = folder.joinpath(*path.split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            # -f: a .gitignore inside the task must not hide its own files from the commit.
            repo.git.add("-A", "-f", "--", rel)
            repo.git.commit("-q", "--no-verify", "--cleanup=whitespace", "-m", message,
                            f"--author={author} <>", "--", rel)
        except BaseException:
            self._restore(rel)
            raise
        return repo.head.commit.hexsha

    def _restore(self, rel: str) -> None:
        """Put tasks/<name> back to HEAD after a failed write."""
        try:
            self._repo.git.reset("-q", "HEAD", "--", rel)
            folder = self.repo_dir / rel
            if folder.exists():
                shutil.rmtree(folder)
            if self._tree_has(self._repo.head.commit, rel):
                self._repo.git.checkout("HEAD", "--", rel)
        except git.GitCommandError:
            pass  # the next open's recovery resets the working tree

    @staticmethod
    def _tree_has(commit: git.Commit, rel: str) -> bool:
        try:
            commit.tree / rel
            return True
        except KeyError:
            return False

    # --- the HEAD-dependent index ---------------------------------------------------------------

    def _refresh_index(self) -> None:
        """Bring the per-task commit lists up to HEAD, reading only commits added since last time."""
        head = self._head_sha()
        if head == self._index_head:
            return
        old = self._index_head
        if old is not None and self._is_ancestor(old, head):
            new = self._log(f"{old}..{head}")
            for name, shas in new.items():
                self._index[name] = shas + self._index.get(name, [])
        else:
            self._index = self._log(head)
        self._index_head = head

    def _head_sha(self) -> str:
        # Hot path: read the loose ref directly (git replaces it atomically); GitPython's walk costs ~0.3 ms.
        gitdir = self.repo_dir / ".git"
        try:
            head = (gitdir / "HEAD").read_text().strip()
            if head.startswith("ref: refs/heads/"):
                head = (gitdir / head[5:]).read_text().strip()
            if re.fullmatch(r"[0-9a-f]{40}", head):
                return head
        except OSError:
            pass
        return self._repo.head.commit.hexsha   # packed refs, detached HEAD, ...

    def _is_ancestor(self, a: str, b: str) -> bool:
        try:
            self._repo.git.merge_base("--is-ancestor", a, b)
            return True
        except git.GitCommandError:
            return False

    def _log(self, rev: str) -> dict[str, list[str]]:
        """name -> commits (newest first) in `rev` that changed tasks/<name>."""
        # Task names are plain ASCII, so even a quoted path ("tasks/x/\\303...") yields the right name.
        out = self._repo.git.log("--format=>%H", "--name-only", "--no-renames", rev, "--", "tasks/")
        index: dict[str, list[str]] = {}
        sha = ""
        for line in out.splitlines():
            if line.startswith(">"):
                sha = line[1:]
                continue
            parts = line.lstrip('"').split("/")
            if len(parts) >= 3 and parts[0] == "tasks" and sha:
                shas = index.setdefault(parts[1], [])
                if not shas or shas[-1] != sha:
                    shas.append(sha)
        return index

    # --- reading --------------------------------------------------------------------------------

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise InvalidArgument(f"task name must match {NAME_RE.pattern} (got {name!r})")

    def resolve(self, name: str, version: str = "") -> str:
        """Full commit id of `name` at `version` ("" = latest; a unique prefix of >= 4 hex chars is fine)."""
        self._check_name(name)
        if not isinstance(version, str):
            raise InvalidArgument(f"version must be a string (got {version!r})")
        version = version.strip().lower()
        if version and not _HEX_RE.match(version):
            raise InvalidArgument(f"version must be 4 to 40 hex characters (got {version!r})")
        with self._lock:
            self._refresh_index()
            shas = self._index.get(name)
            if not shas:
                raise NotFound(f"unknown task '{name}'")
            if not version:
                return shas[0]
            matches = [s for s in shas if s.startswith(version)]
        if not matches:
            raise NotFound(f"task '{name}' has no version '{version}'")
        if len(matches) > 1:
            raise InvalidArgument(f"version '{version}' of task '{name}' is ambiguous: it matches "
                                  f"{len(matches)} versions ({', '.join(m[:12] for m in matches[:5])})")
        return matches[0]

    def _commit_files(self, name: str, sha: str) -> dict[str, bytes]:
        cached = self._files.get((name, sha))
        if cached is not None:
            return cached
        commit = self._repo.commit(sha)
        prefix = f"tasks/{name}/"
        try:
            tree = commit.tree / f"tasks/{name}"
        except KeyError:
            raise NotFound(f"task '{name}' does not exist at version {sha}") from None
        files: dict[str, bytes] = {}
        for item in tree.traverse():
            if item.type == "tree":
                continue
            if item.type != "blob" or item.mode not in (0o100644, 0o100755):
                raise FailedPrecondition(f"task '{name}' at {sha} holds {item.path!r}, which is not a plain file")
            files[item.path[len(prefix):]] = item.data_stream.read()
        self._files.put((name, sha), files, sum(len(d) for d in files.values()))
        return files

    def _version(self, name: str, sha: str) -> TaskVersion:
        key = (name, sha)
        tv = self._versions.get(key)
        if tv is not None:
            return tv
        files = self._commit_files(name, sha)
        try:
            manifest = validate_task_files(files)
        except InvalidArgument as e:
            raise FailedPrecondition(f"task '{name}' at {sha} is not valid: {e.message}") from None
        data = _bundle.pack(files)
        dg = _bundle.digest(data)
        self._store_bundle(dg, data)
        self._digest_source.setdefault(dg, key)
        commit = self._repo.commit(sha)
        tv = TaskVersion(name=name, version=sha, message=commit.message.strip(), author=commit.author.name,
                         created_at=int(commit.authored_date), bundle_digest=dg, bundle_size=len(data),
                         manifest=manifest)
        self._versions[key] = tv
        return tv

    def get(self, name: str, version: str = "") -> TaskVersion:
        """The task version (latest when `version` is "")."""
        if version and len(version) == 40:
            tv = self._versions.get((name, version))  # hot path: no lock, no git
            if tv is not None:
                return tv
        with self._lock:
            return self._version(name, self.resolve(name, version))

    def history(self, name: str) -> list[TaskVersion]:
        """All versions of `name`, newest first."""
        self._check_name(name)
        with self._lock:
            self._refresh_index()
            shas = list(self._index.get(name, []))
            if not shas:
                raise NotFound(f"unknown task '{name}'")
            return [self._version(name, s) for s in shas]

    def list_tasks(self) -> list[TaskVersion]:
        """The latest version of every task, sorted by name."""
        with self._lock:
            self._refresh_index()
            return [self._version(n, shas[0]) for n, shas in sorted(self._index.items()) if shas]

    def files(self, name: str, version: str = "") -> dict[str, bytes]:
        """The task's files at `version` (paths relative to the task folder)."""
        with self._lock:
            return dict(self._commit_files(name, self.resolve(name, version)))

    def diff(self, name: str, v1: str, v2: str) -> str:
        """Unified diff of the task folder from v1 to v2 (paths relative to the folder); "" if identical."""
        with self._lock:
            a, b = self.resolve(name, v1), self.resolve(name, v2)
            return self._repo.git.diff("--no-color", "--no-ext-diff", f"--relative=tasks/{name}/", a, b,
                                       "--", f"tasks/{name}/", strip_newline_in_stdout=False)

    # --- bundles --------------------------------------------------------------------------------

    def _bundle_path(self, dg: str) -> Path:
        return self.bundle_dir / dg[len(_bundle.DIGEST_PREFIX):]

    def _store_bundle(self, dg: str, data: bytes) -> None:
        self._bundles.put(dg, data, len(data))
        path = self._bundle_path(dg)
        if path.exists():
            return
        write_atomic(path, data)

    def bundle(self, name: str, version: str = "") -> tuple[str, bytes]:
        """(digest, bytes) of the task version's deterministic bundle."""
        tv = self.get(name, version)
        data = self._bundles.get(tv.bundle_digest)
        if data is not None:
            return tv.bundle_digest, data
        return tv.bundle_digest, self.bundle_by_digest(tv.bundle_digest)

    def bundle_by_digest(self, digest: str) -> bytes:
        """Bundle bytes by digest; the cached file is re-verified, and rebuilt if it was corrupted."""
        if not isinstance(digest, str) or not re.match(r"^sha256:[0-9a-f]{64}$", digest):
            raise InvalidArgument(f"bundle digest must look like 'sha256:<64 lowercase hex>' (got {digest!r})")
        with self._lock:
            data = self._bundles.get(digest)
            if data is not None:
                return data
            path = self._bundle_path(digest)
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                data = None
            if data is not None:
                try:
                    _bundle.verify(data, digest)
                    self._bundles.put(digest, data, len(data))
                    return data
                except _bundle.BundleError:
                    path.unlink(missing_ok=True)   # corrupted on disk: drop it, rebuild below if we can
            source = self._digest_source.get(digest)
            if source is None:
                # Missing or corrupt on disk and not seen by this process: look through every version once.
                self._refresh_index()
                for name, shas in self._index.items():
                    for sha in shas:
                        try:
                            self._version(name, sha)
                        except WalleError:
                            continue  # an unreadable old version cannot be the source
                source = self._digest_source.get(digest)
            if source is None:
                raise NotFound(f"unknown bundle {digest}")
            data = _bundle.pack(self._commit_files(*source))
            _bundle.verify(data, digest)
            self._store_bundle(digest, data)
            return data
