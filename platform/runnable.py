"""Submit-time check that a task's scripts can run in the device sandbox, by the sandbox's own rules:
every .py file compiles under the sandbox's TaskPolicy, every import resolves the way the sandbox's
import hook resolves it (its curated modules from walle.device_host.sandbox.policy, the `walle` API
groups, the bundle's own .py files), and the entry script defines `main`."""
from __future__ import annotations

import ast
import ctypes
import os
import sys
import threading

from .errors import InvalidArgument

_rules = None
_rules_lock = threading.Lock()


def _sandbox_rules():
    """(policy module, walle API names), imported on first use: the policy imports numpy and MNN,
    and MNN prints a banner on import, which must not end up in a command's --json output."""
    global _rules
    with _rules_lock:
        if _rules is None:
            sys.stdout.flush()
            saved = os.dup(1)
            try:
                os.dup2(2, 1)
                from walle.device_host.sandbox import child, policy
                ctypes.CDLL(None).fflush(None)  # C stdio buffers too
            finally:
                os.dup2(saved, 1)
                os.close(saved)
            _rules = (policy, frozenset(child.API_GROUPS) | {"HostAPIError"})
        return _rules


def check_runnable(files: dict[str, bytes], entry: str) -> None:
    """InvalidArgument naming the first reason the task's scripts could not run in the sandbox."""
    policy, walle_names = _sandbox_rules()
    sources = {}
    for path, data in files.items():
        if path.endswith(".py"):
            try:
                sources[path] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidArgument(f"{path} is not UTF-8 text") from None
    # Task libraries travel at _lib/<name>/ and are imported by their own name (docs/libraries-and-config.md).
    modules = [p[len("_lib/"):] if p.startswith("_lib/") else p for p in sources]
    bundle = {p[:-3].replace("/", ".") for p in modules}
    bundle |= {p[:-len("/__init__.py")].replace("/", ".") for p in modules if p.endswith("/__init__.py")}
    trees = {}
    for path, src in sources.items():
        try:
            policy.compile_task(src, path)
            trees[path] = ast.parse(src, path)
        except SyntaxError as e:
            raise InvalidArgument(f"{path} would not compile in the device sandbox: {e}") from None
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    _check_import(policy, walle_names, bundle, path, node.lineno, alias.name, ())
            elif isinstance(node, ast.ImportFrom):
                if node.level and path.startswith("_lib/"):
                    continue  # inside a library package, the sandbox resolves relative imports
                if node.level:
                    raise InvalidArgument(f"{path}:{node.lineno}: relative imports are not supported in tasks; "
                                          "use `import helpers`")
                _check_import(policy, walle_names, bundle, path, node.lineno, node.module or "",
                              tuple(a.name for a in node.names))
    if entry in trees and not _defines_main(trees[entry]):
        raise InvalidArgument(f"entry script {entry} does not define main(event): the device calls main(event)")


def _check_import(policy, walle_names, bundle: set, path: str, line: int, dotted: str, names: tuple) -> None:
    where = f"{path}:{line}"
    if "*" in names:
        raise InvalidArgument(f"{where}: `import *` is not allowed in tasks")
    head, *rest = dotted.split(".")
    allowed = sorted(policy.MODULES) + ["walle", "the task bundle's own .py files"]
    if head == "walle":
        if rest:
            raise InvalidArgument(f"{where}: module {dotted!r} is not available in the sandbox; "
                                  f"use `from walle import {rest[0]}`")
        for n in names:
            if n not in walle_names:
                raise InvalidArgument(f"{where}: cannot import name {n!r} from 'walle' "
                                      f"(host APIs: {', '.join(sorted(walle_names))})")
        return
    if head == "MNN" and policy.MNN is None:
        return  # this platform has no MNN wheel to check against; devices without one refuse the run
    if head in policy.MODULES:
        obj = policy.MODULES[head]
        for part in rest:
            obj = getattr(obj, part, None) if isinstance(obj, policy.Namespace) else None
            if not isinstance(obj, policy.Namespace):
                raise InvalidArgument(f"{where}: module {dotted!r} is not available in the sandbox")
        for n in names:
            if getattr(obj, n, None) is None:
                raise InvalidArgument(f"{where}: cannot import name {n!r} from {dotted!r} in the sandbox")
        return
    parts = dotted.split(".")
    if not all(".".join(parts[:i]) in bundle for i in range(1, len(parts) + 1)):
        raise InvalidArgument(f"{where}: module {dotted!r} is not available in the sandbox "
                              f"(allowed: {', '.join(allowed)})")


def _defines_main(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == "main":
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "main" for t in node.targets):
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any((a.asname or a.name) == "main" for a in node.names):
            return True
    return False
