"""Task manifests (`task.toml`) and task folder validation.

A task is a folder holding a `task.toml` manifest and Python scripts. Everything a device will run passes
through here first, so the checks are strict: unknown keys are errors (a typo must not silently fall
back to a default), every script must compile, and the folder must be plain files with clean names.
Scripts are only compiled, never executed: their `from walle import ...` exists only inside the sandbox.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from walle.platform import taskconfig
from walle.platform.errors import InvalidArgument
from walle.protos import bundle as _bundle
from walle.protos import namespaces as _namespaces
from walle.protos import device_pb2

MANIFEST_FILE = "task.toml"
NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
EVENT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$")
TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
VERSION_RE = re.compile(r"^\d+(\.\d+){0,3}([-+][0-9A-Za-z.-]+)?$")
APIS = ("storage", "model", "tunnel", "events", "log")
TRIGGER_KINDS = {"event": ("event",), "table_rows": ("table", "min_rows"), "schedule": ("every_seconds",)}
MAX_TRIGGERS = 32
MAX_DESCRIPTION = 4096

MAX_TASK_FILES = 200
MAX_TASK_FILE_SIZE = 1024 * 1024
MAX_TASK_TOTAL_SIZE = 8 * 1024 * 1024
IGNORED_DIRS = {"__pycache__", ".git"}
IGNORED_FILES = {".DS_Store"}
# A task folder is stored inside a git repository: these names would change how git stores it.
RESERVED_NAMES = {".git", ".gitattributes"}

_TOP_KEYS = ("name", "entry", "description", "apis", "min_host_version", "namespace", "limits", "triggers",
             "namespace_members", "libraries", "config")
MAX_NAMESPACE_MEMBERS = 32
# Storage namespaces: what the device storage accepts as a task name (no "-", no "__").
NAMESPACE_RE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")
_LIMIT_KEYS = ("memory_mb", "cpu_seconds", "wall_seconds")
# Task libraries: shared code in tasks/_lib/<name>/, copied into each bundle that declares it (at _lib/<name>/).
LIB_DIR = "_lib"
LIBRARY_FILE = "library.toml"
LIBRARY_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
MAX_LIBRARIES = 16
_LIBRARY_KEYS = ("description", "libraries")
# Modules the sandbox provides itself (device_host/sandbox/policy.py): a library cannot take their names.
SANDBOX_MODULES = ("numpy", "math", "json", "random", "walle", "mnn")


class ManifestError(InvalidArgument):
    """task.toml is malformed or breaks a rule; the message names the field."""


class TaskFolderError(InvalidArgument):
    """A task folder breaks a rule (missing entry, bad script, unsafe path, too big); names the file."""


@dataclass(frozen=True)
class Limits:
    memory_mb: int = 256
    cpu_seconds: float = 10.0
    wall_seconds: float = 30.0


@dataclass(frozen=True)
class Trigger:
    kind: str                     # "event" | "table_rows" | "schedule"
    event: str = ""
    table: str = ""
    min_rows: int = 0
    every_seconds: float = 0.0

    def to_proto(self) -> device_pb2.Trigger:
        return device_pb2.Trigger(kind=self.kind, event=self.event, table=self.table,
                                  min_rows=self.min_rows, every_seconds=self.every_seconds)


@dataclass(frozen=True)
class Manifest:
    name: str
    entry: str
    description: str = ""
    apis: tuple[str, ...] = ()
    min_host_version: str = ""
    limits: Limits = field(default_factory=Limits)
    triggers: tuple[Trigger, ...] = ()
    namespace: str = ""
    namespace_members: tuple[str, ...] = ()
    libraries: tuple[str, ...] = ()
    config: tuple[taskconfig.ConfigParam, ...] = ()

    @property
    def storage_namespace(self) -> str:
        """Where the task's storage lives: its declared namespace, shared with the tasks it grants in
        namespace_members (the CoDA tasks share "coda"), else one derived from its name."""
        return _namespaces.storage_scope(self)

    def to_proto(self) -> device_pb2.TaskManifest:
        return device_pb2.TaskManifest(
            name=self.name, entry=self.entry, description=self.description,
            triggers=[t.to_proto() for t in self.triggers],
            limits=device_pb2.Limits(memory_mb=self.limits.memory_mb, cpu_seconds=self.limits.cpu_seconds,
                                     wall_seconds=self.limits.wall_seconds),
            apis=list(self.apis), min_host_version=self.min_host_version, namespace=self.namespace,
            namespace_members=list(self.namespace_members),
            libraries=list(self.libraries), config=[_param_proto(p) for p in self.config])

    @classmethod
    def from_proto(cls, pb: device_pb2.TaskManifest) -> "Manifest":
        """Rebuild (and re-validate) a manifest received over the wire."""
        data: dict[str, Any] = {"name": pb.name, "entry": pb.entry, "apis": list(pb.apis)}
        if pb.description:
            data["description"] = pb.description
        if pb.min_host_version:
            data["min_host_version"] = pb.min_host_version
        if pb.namespace:
            data["namespace"] = pb.namespace
        if pb.namespace_members:
            data["namespace_members"] = list(pb.namespace_members)
        if pb.libraries:
            data["libraries"] = list(pb.libraries)
        if pb.config:
            data["config"] = {p.name: _param_dict(p) for p in pb.config}
        if pb.HasField("limits"):
            data["limits"] = {"memory_mb": pb.limits.memory_mb, "cpu_seconds": pb.limits.cpu_seconds,
                              "wall_seconds": pb.limits.wall_seconds}
        triggers = []
        for t in pb.triggers:
            d: dict[str, Any] = {"kind": t.kind}
            for key in TRIGGER_KINDS.get(t.kind, ()):
                d[key] = getattr(t, key)
            triggers.append(d)
        data["triggers"] = triggers
        return _from_dict(data, "task manifest")

    def to_toml(self) -> str:
        """TOML text that parses back to this manifest."""
        lines = [f"name = {_toml_str(self.name)}", f"entry = {_toml_str(self.entry)}"]
        if self.description:
            lines.append(f"description = {_toml_str(self.description)}")
        lines.append("apis = [" + ", ".join(_toml_str(a) for a in self.apis) + "]")
        if self.min_host_version:
            lines.append(f"min_host_version = {_toml_str(self.min_host_version)}")
        if self.namespace:
            lines.append(f"namespace = {_toml_str(self.namespace)}")
        if self.namespace_members:
            lines.append("namespace_members = [" + ", ".join(_toml_str(m) for m in self.namespace_members) + "]")
        if self.libraries:
            lines.append("libraries = [" + ", ".join(_toml_str(lib) for lib in self.libraries) + "]")
        lines += ["", "[limits]", f"memory_mb = {self.limits.memory_mb}",
                  f"cpu_seconds = {self.limits.cpu_seconds!r}", f"wall_seconds = {self.limits.wall_seconds!r}"]
        for p in self.config:
            lines += ["", f"[config.{p.name}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in p.describe().items()]
        for t in self.triggers:
            lines += ["", "[[triggers]]", f"kind = {_toml_str(t.kind)}"]
            if t.kind == "event":
                lines.append(f"event = {_toml_str(t.event)}")
            elif t.kind == "table_rows":
                lines += [f"table = {_toml_str(t.table)}", f"min_rows = {t.min_rows}"]
            else:
                lines.append(f"every_seconds = {t.every_seconds!r}")
        return "\n".join(lines) + "\n"


def _param_proto(p: taskconfig.ConfigParam) -> device_pb2.ConfigParam:
    return device_pb2.ConfigParam(
        name=p.name, type=p.type, default_json=json.dumps(p.default), help=p.help,
        min_json="" if p.min is None else json.dumps(p.min), max_json="" if p.max is None else json.dumps(p.max),
        choices_json=[json.dumps(c) for c in p.choices])


def _param_dict(pb: device_pb2.ConfigParam) -> dict:
    try:
        d: dict[str, Any] = {"type": pb.type, "default": json.loads(pb.default_json), "help": pb.help}
        if pb.min_json:
            d["min"] = json.loads(pb.min_json)
        if pb.max_json:
            d["max"] = json.loads(pb.max_json)
        if pb.choices_json:
            d["choices"] = [json.loads(c) for c in pb.choices_json]
    except ValueError as e:
        raise ManifestError(f"task manifest: config.{pb.name} holds invalid JSON: {e}") from None
    return d


def _toml_value(v: Any) -> str:
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def _toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def parse_manifest(text: str) -> Manifest:
    """Parse and validate task.toml text; raises ManifestError naming the field and the problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"{MANIFEST_FILE}: invalid TOML: {e}") from None
    return _from_dict(data, MANIFEST_FILE)


# --- validation of the parsed table -------------------------------------------------------------

def _unknown_keys(table: dict, allowed: tuple[str, ...], where: str, src: str) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f" (did you mean '{where}{close[0]}'?)" if close else f" (allowed: {', '.join(allowed)})"
            raise ManifestError(f"{src}: unknown key '{where}{key}'{hint}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _string(data: dict, key: str, src: str, label: str | None = None, required: bool = False) -> str:
    label = label or key
    if key not in data:
        if required:
            raise ManifestError(f"{src}: {label} is required")
        return ""
    v = data[key]
    if not isinstance(v, str):
        raise ManifestError(f"{src}: {label} must be a string (got {v!r})")
    return v


def _from_dict(data: dict, src: str) -> Manifest:
    _unknown_keys(data, _TOP_KEYS, "", src)

    name = _string(data, "name", src, required=True)
    if not NAME_RE.match(name):
        raise ManifestError(f"{src}: name must be a lowercase letter followed by up to 63 of a-z 0-9 _ - "
                            f"(got {name!r})")

    entry = _string(data, "entry", src, required=True)
    problem = _bundle.path_problem(entry)
    if problem or not entry.endswith(".py"):
        why = problem or "it does not end in .py"
        raise ManifestError(f"{src}: entry must be the relative path of a .py file in the task folder "
                            f"(got {entry!r}: {why})")

    description = _string(data, "description", src)
    if len(description) > MAX_DESCRIPTION:
        raise ManifestError(f"{src}: description must be at most {MAX_DESCRIPTION} characters "
                            f"(got {len(description)})")

    apis_raw = data.get("apis", [])
    if not isinstance(apis_raw, list):
        raise ManifestError(f"{src}: apis must be a list of strings (got {apis_raw!r})")
    apis: list[str] = []
    for i, api in enumerate(apis_raw):
        if api not in APIS:
            raise ManifestError(f"{src}: apis[{i}] must be one of {', '.join(APIS)} (got {api!r})")
        if api in apis:
            raise ManifestError(f"{src}: apis lists {api!r} twice")
        apis.append(api)

    min_host_version = _string(data, "min_host_version", src)
    if min_host_version and not VERSION_RE.match(min_host_version):
        raise ManifestError(f"{src}: min_host_version must be a version like '0.1.0' (got {min_host_version!r})")

    namespace = _string(data, "namespace", src)
    if namespace and (not NAMESPACE_RE.match(namespace) or len(namespace) > 48):
        raise ManifestError(f"{src}: namespace must be lowercase letters and digits in words joined by single "
                            f"'_', at most 48 characters (got {namespace!r})")

    members = _namespace_members(data, name, namespace, src)
    limits = _limits(data.get("limits", {}), src)
    triggers = _triggers(data.get("triggers", []), src)
    libraries = _library_names(data.get("libraries", []), src, "libraries")
    config = taskconfig.parse_schema(data.get("config", {}), src)
    return Manifest(name=name, entry=entry, description=description, apis=tuple(apis),
                    min_host_version=min_host_version, limits=limits, triggers=triggers, namespace=namespace,
                    namespace_members=members, libraries=libraries, config=config)


def _namespace_members(data: dict, name: str, namespace: str, src: str) -> tuple[str, ...]:
    """The tasks this one grants to share its namespace (see walle.protos.namespaces); itself included."""
    raw = data.get("namespace_members", [])
    if not isinstance(raw, list) or not all(isinstance(m, str) for m in raw):
        raise ManifestError(f"{src}: namespace_members must be a list of task names (got {raw!r})")
    if raw and not namespace:
        raise ManifestError(f"{src}: namespace_members needs a namespace to share")
    if len(raw) > MAX_NAMESPACE_MEMBERS:
        raise ManifestError(f"{src}: namespace_members lists {len(raw)} tasks; at most {MAX_NAMESPACE_MEMBERS}")
    for i, m in enumerate(raw):
        if not NAME_RE.match(m):
            raise ManifestError(f"{src}: namespace_members[{i}] is not a task name (got {m!r})")
    if len(set(raw)) != len(raw):
        raise ManifestError(f"{src}: namespace_members lists a task twice")
    if raw and name not in raw:
        raise ManifestError(f"{src}: namespace_members must include this task ({name!r}) itself")
    return tuple(sorted(raw))


def _library_names(raw: Any, src: str, label: str) -> tuple[str, ...]:
    if not isinstance(raw, list):
        raise ManifestError(f"{src}: {label} must be a list of library names (got {raw!r})")
    if len(raw) > MAX_LIBRARIES:
        raise ManifestError(f"{src}: {label} lists {len(raw)} libraries; at most {MAX_LIBRARIES} are allowed")
    out: list[str] = []
    for i, lib in enumerate(raw):
        if not isinstance(lib, str):
            raise ManifestError(f"{src}: {label}[{i}] must be a string (got {lib!r})")
        if "/" in lib or "\\" in lib or lib.startswith("."):
            raise ManifestError(f"{src}: {label}[{i}] {lib!r} escapes the tasks folder: a library is named by its "
                                f"folder in tasks/{LIB_DIR}/, not by a path")
        if not LIBRARY_NAME_RE.match(lib):
            raise ManifestError(f"{src}: {label}[{i}] must be a library name: a lowercase letter, then up to 47 of "
                                f"a-z 0-9 _ (it is imported as a Python package) (got {lib!r})")
        if lib in SANDBOX_MODULES:
            raise ManifestError(f"{src}: {label}[{i}] {lib!r} is the name of a module the sandbox provides")
        if lib in out:
            raise ManifestError(f"{src}: {label} lists {lib!r} twice")
        out.append(lib)
    return tuple(out)


def parse_library_manifest(text: str, src: str) -> tuple[str, ...]:
    """The libraries a library needs, from its optional library.toml (keys: description, libraries)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"{src}: invalid TOML: {e}") from None
    _unknown_keys(data, _LIBRARY_KEYS, "", src)
    _string(data, "description", src)
    return _library_names(data.get("libraries", []), src, "libraries")


def _limits(raw: Any, src: str) -> Limits:
    if not isinstance(raw, dict):
        raise ManifestError(f"{src}: limits must be a table (got {raw!r})")
    _unknown_keys(raw, _LIMIT_KEYS, "limits.", src)
    d = Limits()
    memory_mb = raw.get("memory_mb", d.memory_mb)
    if not _is_int(memory_mb) or not 16 <= memory_mb <= 4096:
        raise ManifestError(f"{src}: limits.memory_mb must be an integer between 16 and 4096 (got {memory_mb!r})")
    cpu = raw.get("cpu_seconds", d.cpu_seconds)
    if not _is_number(cpu) or not 0 < cpu <= 3600:
        raise ManifestError(f"{src}: limits.cpu_seconds must be a number above 0 and at most 3600 (got {cpu!r})")
    wall = raw.get("wall_seconds", d.wall_seconds)
    if not _is_number(wall) or not 0 < wall <= 7200:
        raise ManifestError(f"{src}: limits.wall_seconds must be a number above 0 and at most 7200 (got {wall!r})")
    return Limits(memory_mb=memory_mb, cpu_seconds=float(cpu), wall_seconds=float(wall))


def _triggers(raw: Any, src: str) -> tuple[Trigger, ...]:
    if not isinstance(raw, list):
        raise ManifestError(f"{src}: triggers must be an array of tables ([[triggers]]) (got {raw!r})")
    if len(raw) > MAX_TRIGGERS:
        raise ManifestError(f"{src}: at most {MAX_TRIGGERS} triggers are allowed (got {len(raw)})")
    all_keys = ("kind",) + tuple(k for keys in TRIGGER_KINDS.values() for k in keys)
    out: list[Trigger] = []
    for i, t in enumerate(raw):
        at = f"triggers[{i}]"
        if not isinstance(t, dict):
            raise ManifestError(f"{src}: {at} must be a table (got {t!r})")
        _unknown_keys(t, all_keys, at + ".", src)
        kind = _string(t, "kind", src, label=f"{at}.kind", required=True)
        if kind not in TRIGGER_KINDS:
            raise ManifestError(f"{src}: {at}.kind must be one of {', '.join(TRIGGER_KINDS)} (got {kind!r})")
        for key in t:
            if key != "kind" and key not in TRIGGER_KINDS[kind]:
                raise ManifestError(f"{src}: {at}.{key} is not allowed for kind '{kind}' "
                                    f"(it takes: {', '.join(TRIGGER_KINDS[kind])})")
        if kind == "event":
            event = _string(t, "event", src, label=f"{at}.event", required=True)
            if not EVENT_RE.match(event):
                raise ManifestError(f"{src}: {at}.event must be an event name like 'batch_received' or "
                                    f"'page_view:home' (got {event!r})")
            trig = Trigger(kind=kind, event=event)
        elif kind == "table_rows":
            table = _string(t, "table", src, label=f"{at}.table", required=True)
            if not TABLE_RE.match(table):
                raise ManifestError(f"{src}: {at}.table must be a table name of letters, digits and _ "
                                    f"(got {table!r})")
            if "min_rows" not in t:
                raise ManifestError(f"{src}: {at}.min_rows is required for kind 'table_rows'")
            min_rows = t["min_rows"]
            if not _is_int(min_rows) or not 1 <= min_rows <= 10**9:
                raise ManifestError(f"{src}: {at}.min_rows must be an integer between 1 and 1000000000 "
                                    f"(got {min_rows!r})")
            trig = Trigger(kind=kind, table=table, min_rows=min_rows)
        else:
            if "every_seconds" not in t:
                raise ManifestError(f"{src}: {at}.every_seconds is required for kind 'schedule'")
            every = t["every_seconds"]
            if not _is_number(every) or not 1 <= every <= 31_536_000:
                raise ManifestError(f"{src}: {at}.every_seconds must be a number between 1 and 31536000 "
                                    f"(got {every!r})")
            trig = Trigger(kind=kind, every_seconds=float(every))
        if trig in out:
            raise ManifestError(f"{src}: {at} duplicates triggers[{out.index(trig)}]")
        out.append(trig)
    return tuple(out)


# --- task folders ---------------------------------------------------------------------------------

def is_ignored(path: str) -> bool:
    """Editor/interpreter litter that is never part of a task (caches, .DS_Store, a nested .git)."""
    parts = path.split("/")
    return (any(p in IGNORED_DIRS for p in parts[:-1]) or parts[-1] in IGNORED_FILES
            or parts[-1].endswith(".pyc"))


def strip_ignored(files: dict[str, bytes]) -> dict[str, bytes]:
    """`files` without the ignored entries (see is_ignored)."""
    return {p: d for p, d in files.items() if not (isinstance(p, str) and is_ignored(p))}


def validate_task_files(files: dict[str, bytes]) -> Manifest:
    """Check a task's files (relative path -> content); return its manifest or raise TaskFolderError/ManifestError."""
    if len(files) > MAX_TASK_FILES:
        raise TaskFolderError(f"task folder has {len(files)} files; at most {MAX_TASK_FILES} are allowed "
                              f"(libraries included)")
    total = 0
    for path in sorted(files, key=str):
        problem = _bundle.path_problem(path)
        if problem:
            raise TaskFolderError(f"task file {path!r}: {problem}")
        if any(p.lower() in RESERVED_NAMES for p in path.split("/")):
            raise TaskFolderError(f"task file {path!r}: names .git and .gitattributes are reserved")
        data = files[path]
        if not isinstance(data, bytes):
            raise TaskFolderError(f"task file {path!r}: content must be bytes (got {type(data).__name__})")
        if len(data) > MAX_TASK_FILE_SIZE:
            raise TaskFolderError(f"task file {path!r} is {len(data)} bytes; at most {MAX_TASK_FILE_SIZE} "
                                  f"are allowed per file")
        total += len(data)
    if total > MAX_TASK_TOTAL_SIZE:
        raise TaskFolderError(f"task files total {total} bytes; at most {MAX_TASK_TOTAL_SIZE} are allowed "
                              f"(libraries included)")
    for path in files:
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in files:
                raise TaskFolderError(f"task file {'/'.join(parts[:i])!r} is both a file and a folder")

    if MANIFEST_FILE not in files:
        raise TaskFolderError(f"task folder has no {MANIFEST_FILE}")
    try:
        text = files[MANIFEST_FILE].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{MANIFEST_FILE}: not valid UTF-8 (byte {e.start})") from None
    manifest = parse_manifest(text)
    if manifest.entry not in files:
        raise TaskFolderError(f"task entry {manifest.entry!r} (from {MANIFEST_FILE}) is not in the task folder")
    if manifest.entry.split("/")[0] == LIB_DIR:
        raise TaskFolderError(f"task entry {manifest.entry!r} is inside {LIB_DIR}/, which holds libraries")
    _check_bundled_libraries(files, manifest)

    for path in sorted(files):
        if path.endswith(".py"):
            _compile_check(path, files[path])
    return manifest


def _library_deps(files: dict[str, bytes], name: str) -> tuple[str, ...]:
    path = f"{LIB_DIR}/{name}/{LIBRARY_FILE}"
    if path not in files:
        return ()
    try:
        text = files[path].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    return parse_library_manifest(text, path)


def library_closure(roots: tuple[str, ...], deps_of, where: str = MANIFEST_FILE) -> list[str]:
    """Every library `roots` need, directly or through other libraries (depth first, each once).

    `deps_of(name)` returns a library's own dependencies, or raises TaskFolderError for an unknown one.
    A cycle is refused: libraries are layered, so each one's imports stay understandable."""
    order: list[str] = []

    def visit(name: str, chain: list[str]) -> None:
        if name in chain:
            raise TaskFolderError(f"library cycle: {' -> '.join(chain[chain.index(name):] + [name])}")
        if name in order:
            return
        deps = deps_of(name, f"library {chain[-1]!r}" if chain else where)
        for dep in deps:
            visit(dep, chain + [name])
        order.append(name)

    for root in roots:
        visit(root, [])
    return order


def _check_bundled_libraries(files: dict[str, bytes], manifest: Manifest) -> None:
    """The bundle's _lib/ holds exactly the libraries task.toml needs (transitively), each a package."""
    present: set[str] = set()
    for path in files:
        parts = path.split("/")
        if parts[0] != LIB_DIR:
            continue
        if len(parts) < 3:
            raise TaskFolderError(f"task file {path!r}: {LIB_DIR}/ holds only library folders ({LIB_DIR}/<name>/...)")
        present.add(parts[1])

    def deps_of(name: str, wanted_by: str) -> tuple[str, ...]:
        if name not in present:
            raise TaskFolderError(f"unknown library {name!r} (needed by {wanted_by}): the bundle has no "
                                  f"{LIB_DIR}/{name}/; `walle task submit` copies it from tasks/{LIB_DIR}/{name}/")
        return _library_deps(files, name)

    needed = library_closure(manifest.libraries, deps_of)
    extra = sorted(present - set(needed))
    if extra:
        raise TaskFolderError(f"the bundle holds library {extra[0]!r} in {LIB_DIR}/ but {MANIFEST_FILE} does not "
                              f"declare it (add it to libraries)")
    top = {p.split("/")[0].removesuffix(".py") for p in files if p.split("/")[0] != LIB_DIR}
    for name in needed:
        if f"{LIB_DIR}/{name}/__init__.py" not in files:
            raise TaskFolderError(f"library {name!r} has no __init__.py: a library is a Python package")
        if name in top:
            raise TaskFolderError(f"task file or folder {name!r} has the name of library {name!r}; "
                                  f"`import {name}` would be ambiguous")


def _compile_check(path: str, source: bytes) -> None:
    # Compile only: executing would run imports that exist only inside the device sandbox.
    try:
        compile(source, path, "exec", dont_inherit=True)
    except SyntaxError as e:
        where = f"{path}:{e.lineno}" if e.lineno else path
        raise TaskFolderError(f"{where}: {e.msg}") from None
    except ValueError as e:  # e.g. source with NUL bytes
        raise TaskFolderError(f"{path}: cannot compile: {e}") from None


def read_task_dir(path: str | os.PathLike) -> dict[str, bytes]:
    """Read a task folder's files, refusing symlinks and special files, skipping ignored litter."""
    root = Path(path)
    if not root.is_dir():
        raise TaskFolderError(f"task folder {str(root)!r} does not exist or is not a folder")
    files: dict[str, bytes] = {}
    total = 0

    def walk(folder: Path, prefix: str) -> None:
        nonlocal total
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = prefix + entry.name
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise TaskFolderError(f"task file {rel!r} is a symlink; only plain files are allowed")
            if stat.S_ISDIR(st.st_mode):
                if entry.name not in IGNORED_DIRS:
                    walk(Path(entry.path), rel + "/")
                continue
            if not stat.S_ISREG(st.st_mode):
                raise TaskFolderError(f"task file {rel!r} is a special file; only plain files are allowed")
            if is_ignored(rel):
                continue
            if len(files) >= MAX_TASK_FILES:
                raise TaskFolderError(f"task folder has more than {MAX_TASK_FILES} files")
            if st.st_size > MAX_TASK_FILE_SIZE:
                raise TaskFolderError(f"task file {rel!r} is {st.st_size} bytes; at most {MAX_TASK_FILE_SIZE} "
                                      f"are allowed per file")
            total += st.st_size
            if total > MAX_TASK_TOTAL_SIZE:
                raise TaskFolderError(f"task files total more than {MAX_TASK_TOTAL_SIZE} bytes")
            # O_NOFOLLOW: the file cannot be swapped for a symlink between the check and the read.
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                files[rel] = f.read(MAX_TASK_FILE_SIZE + 1)

    walk(root, "")
    return files


def load_task_dir(path: str | os.PathLike, lib_root: str | os.PathLike | None = None) -> dict[str, bytes]:
    """A task folder's files with the libraries its task.toml declares copied in at _lib/<name>/.

    Libraries are read from `lib_root` (default: the `_lib` folder next to the task folder, i.e.
    tasks/_lib/ for tasks/<name>/), so the bundle built from the result is self-contained."""
    files = read_task_dir(path)
    if any(p.split("/")[0] == LIB_DIR for p in files):
        raise TaskFolderError(f"task folder {str(path)!r} has its own {LIB_DIR}/: libraries live in "
                              f"tasks/{LIB_DIR}/<name>/ and are declared with libraries = [...] in {MANIFEST_FILE}")
    try:
        text = files[MANIFEST_FILE].decode("utf-8") if MANIFEST_FILE in files else ""
    except UnicodeDecodeError:
        return files   # validation reports it
    try:
        manifest = parse_manifest(text)
    except ManifestError:
        return files   # validation reports it, with the same message
    if not manifest.libraries:
        return files
    root = Path(lib_root) if lib_root is not None else Path(path).resolve().parent / LIB_DIR
    libs: dict[str, dict[str, bytes]] = {}

    def deps_of(name: str, wanted_by: str) -> tuple[str, ...]:
        folder = root / name
        if folder.is_symlink():
            raise TaskFolderError(f"library {name!r}: {folder} is a symlink, which could lead outside the tasks "
                                  f"folder; only plain folders are allowed")
        if not folder.is_dir():
            known = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            raise TaskFolderError(f"unknown library {name!r} (needed by {wanted_by}): no folder {folder} "
                                  f"(libraries there: {', '.join(known) or 'none'})")
        try:
            libs[name] = read_task_dir(folder)
        except TaskFolderError as e:
            raise TaskFolderError(f"library {name!r}: {e.message}") from None
        return _library_deps({f"{LIB_DIR}/{name}/{p}": d for p, d in libs[name].items()}, name)

    for name in library_closure(manifest.libraries, deps_of):
        for rel, data in libs[name].items():
            files[f"{LIB_DIR}/{name}/{rel}"] = data
    return files


def validate_task_dir(path: str | os.PathLike,
                      lib_root: str | os.PathLike | None = None) -> tuple[Manifest, dict[str, bytes]]:
    """Read a task folder with its libraries (load_task_dir) and validate it; return its manifest and
    files (relative path -> content): what `walle task submit` sends."""
    files = load_task_dir(path, lib_root)
    return validate_task_files(files), files
