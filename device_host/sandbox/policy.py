"""In-interpreter layer: RestrictedPython TaskPolicy, runtime guards and curated read-only namespaces.

Imported only inside the zygote (it imports numpy and MNN). This layer is for usability and a first line
of defence; the boundary is rlimits + seccomp (+ Landlock) applied by child.py, because numpy and MNN are
C code with memory-read primitives.

What task scripts get:
* modules ``numpy``, ``math``, ``json`` (dumps/loads), ``random``, ``MNN`` (``MNN.expr``, ``MNN.nn``,
  ``MNN.nn.loss``, ``MNN.optim``) and ``walle`` (host API proxies), all as read-only ``Namespace``
  objects with file I/O, ctypes, f2py, memmap, stride_tricks, thread-count and raw-pointer routes removed;
* ``F._F`` (alias ``F.raw``): MNN's raw C++ expr bindings, needed for gradients (mnn-notes section 0);
  ``_F`` is the one underscore name the policy accepts;
* other ``.py`` files of the task bundle via ``import helpers`` (compiled with the same policy; the task
  files and libraries shipped with the host are compiled once in the zygote and reused when a bundle
  carries the very same text at the same path);
* builtins without type/id/vars/delattr/open/eval/exec/compile/globals/__import__; ``super()`` only as
  ``super().__init__(...)`` and never rebound; ``print`` goes to the run's logs.
"""
from __future__ import annotations

import ast
import builtins
import copy
import importlib.resources
import json
import math
import operator
import pathlib
import random
import string
import types
import weakref
from typing import Callable

try:
    import MNN
except ImportError:  # a device without an MNN wheel: the sandbox runs, tasks that need MNN are refused
    MNN = None
import numpy as np
import numpy.fft  # noqa: F401  (import now: nothing can be opened after the seccomp filter)
import numpy.linalg  # noqa: F401
import numpy.random  # noqa: F401
from RestrictedPython import compile_restricted_exec
from RestrictedPython.Guards import guarded_iter_unpack_sequence, guarded_unpack_sequence
from RestrictedPython.transformer import RestrictingNodeTransformer

RAW_MNN_NAME = "_F"


class TaskPolicy(RestrictingNodeTransformer):
    """RestrictedPython's policy plus: the `_F` name, `super().__init__`, and no rebinding of `super`."""

    def check_name(self, node, name, allow_magic_methods=False):  # noqa: ANN001
        if name == RAW_MNN_NAME:
            return
        if name == "super" and not (isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)):
            self.error(node, '"super" is a reserved name and may not be rebound.')
            return
        super().check_name(node, name, allow_magic_methods)

    def visit_Attribute(self, node):  # noqa: ANN001
        if node.attr == "__init__" and isinstance(node.ctx, ast.Load) and _is_plain_super_call(node.value):
            return node  # exactly super().__init__ / super(C, self).__init__: a direct, unguarded lookup
        if node.attr == RAW_MNN_NAME and isinstance(node.ctx, ast.Load):
            func, name = ast.Name("_getattr_", ast.Load()), ast.Constant(RAW_MNN_NAME)
            new = ast.Call(func=func, args=[self.visit(node.value), name], keywords=[])
            for n in (func, name, new):
                ast.copy_location(n, node)
            return new
        return super().visit_Attribute(node)


    def visit_AugAssign(self, node):  # noqa: ANN001
        """`obj.attr += v` and `obj[k] += v` (stock RestrictedPython refuses both) become plain
        assignments `obj.attr = obj.attr + v`, which then go through the usual _getattr_/_write_ guards.
        Only for simple `obj` and `k` (names/constants), so evaluating them twice has no side effects."""
        t = node.target
        simple = (ast.Name, ast.Constant)
        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name):
            load = ast.Attribute(value=ast.Name(t.value.id, ast.Load()), attr=t.attr, ctx=ast.Load())
            store = ast.Attribute(value=ast.Name(t.value.id, ast.Load()), attr=t.attr, ctx=ast.Store())
        elif isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and (
                isinstance(t.slice, simple) or (isinstance(t.slice, ast.Tuple)
                                                and all(isinstance(e, simple) for e in t.slice.elts))):
            load = ast.Subscript(value=ast.Name(t.value.id, ast.Load()), slice=copy.deepcopy(t.slice), ctx=ast.Load())
            store = ast.Subscript(value=ast.Name(t.value.id, ast.Load()), slice=t.slice, ctx=ast.Store())
        else:
            return super().visit_AugAssign(node)
        new = ast.Assign(targets=[store], value=ast.BinOp(left=load, op=node.op, right=node.value))
        for n in ast.walk(new):
            ast.copy_location(n, node)
        return self.visit(new)


def _is_plain_super_call(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"
            and not node.keywords and len(node.args) in (0, 2) and all(isinstance(a, ast.Name) for a in node.args))


# (bundle path, source) -> code, compiled in the zygote before it forks: the task files and libraries
# shipped with this host. RestrictedPython's compile is pure Python (about 0.1 ms per line: ~80 ms
# for the CoDA library on every run); a bundle file with the same path and the same text reuses the
# code object, anything else (a hot-deployed change) is compiled as usual.
_PRECOMPILED: dict[tuple[str, str], types.CodeType] = {}


def compile_task(source: str, filename: str) -> types.CodeType:
    """Compile one bundle file under TaskPolicy; SyntaxError lists every violation."""
    code = _PRECOMPILED.get((filename, source))
    if code is not None:
        return code
    result = compile_restricted_exec(source, filename=filename, policy=TaskPolicy)
    if result.errors:
        raise SyntaxError(f"{filename}: " + "; ".join(result.errors))
    return result.code


class Namespace:
    """A read-only stand-in for a module: only the curated names, no way back to the real module."""

    __slots__ = ("_ns_name", "_ns_attrs")

    def __init__(self, name: str, attrs: dict):
        object.__setattr__(self, "_ns_name", name)
        object.__setattr__(self, "_ns_attrs", attrs)

    def __getattr__(self, name: str):
        if not name.startswith("_") or name == RAW_MNN_NAME:
            try:
                return self._ns_attrs[name]
            except KeyError:
                pass
        raise AttributeError(f"module {self._ns_name!r} has no attribute {name!r} in the sandbox")

    def __setattr__(self, name, value):
        raise TypeError(f"module {self._ns_name!r} is read-only in the sandbox")

    def __delattr__(self, name):
        raise TypeError(f"module {self._ns_name!r} is read-only in the sandbox")

    def __dir__(self):
        return sorted(n for n in self._ns_attrs if not n.startswith("_"))

    def __repr__(self) -> str:
        return f"<sandbox module {self._ns_name!r}>"


def curate(module: types.ModuleType, name: str, deny: frozenset = frozenset(),
           submodules: dict[str, frozenset] | None = None, extra: dict | None = None) -> Namespace:
    """Public, non-denied names of `module`; nested modules only when listed in `submodules`."""
    submodules = submodules or {}
    attrs = {}
    for key, value in vars(module).items():  # vars(), not dir(): never trigger lazy imports (f2py, testing)
        if key.startswith("_") or key in deny:
            continue
        if isinstance(value, types.ModuleType):
            if key in submodules:
                attrs[key] = curate(value, f"{name}.{key}", submodules[key] | deny)
            continue
        attrs[key] = value
    attrs.update(extra or {})
    return Namespace(name, attrs)


_NUMPY_DENY = frozenset(
    "load loadtxt save savetxt savez savez_compressed genfromtxt fromregex fromfile memmap DataSource show_config "
    "show_runtime get_include info from_dlpack test ctypeslib f2py testing lib ma rec char strings core typing "
    "matrixlib polynomial distutils version dtypes exceptions bit_generator mtrand".split()
)
_MNN_DENY = frozenset(
    "save load_as_list load_as_dict set_thread_number set_global_executor_config jsonop np load_module_from_file "
    "RuntimeManager create_runtime_manager compress".split()
)


def _build_modules() -> dict[str, Namespace]:
    numpy_ns = curate(np, "numpy", _NUMPY_DENY,
                      {"linalg": frozenset(), "fft": frozenset(), "random": frozenset(), "emath": frozenset()})
    json_ns = Namespace("json", {"dumps": json.dumps, "loads": json.loads, "JSONDecodeError": json.JSONDecodeError})
    random_ns = Namespace("random", {n: getattr(random, n) for n in (
        "seed random uniform randint randrange choice choices shuffle sample gauss normalvariate expovariate "
        "betavariate lognormvariate triangular getrandbits Random").split()})
    modules = {"numpy": numpy_ns, "math": curate(math, "math"), "json": json_ns, "random": random_ns}
    if MNN is not None:
        raw = curate(MNN.expr._F, "MNN.expr._F", _MNN_DENY)
        expr = curate(MNN.expr, "MNN.expr", _MNN_DENY, extra={RAW_MNN_NAME: raw, "raw": raw})
        nn = curate(MNN.nn, "MNN.nn", _MNN_DENY, {"loss": frozenset()})
        optim = curate(MNN.optim, "MNN.optim", _MNN_DENY)
        modules["MNN"] = Namespace("MNN", {"expr": expr, "nn": nn, "optim": optim})
    return modules


MODULES = _build_modules()
JSON_NS = MODULES["json"]

# ---------------------------------------------------------------------------------------------------
# Runtime guards

_DENIED_ATTRS = frozenset((
    # frames, code, tracebacks, generators/coroutines (also refused at compile time for literal names)
    "tb_frame", "tb_next", "f_back", "f_builtins", "f_code", "f_generator", "f_globals", "f_locals", "f_trace",
    "co_code", "gi_frame", "gi_code", "gi_yieldfrom", "cr_frame", "cr_code", "cr_await", "ag_frame", "ag_code",
    "ag_await", "mro",
    # raw memory, files and native code
    "ctypes", "cffi", "ctypeslib", "tofile", "dump", "ptr", "copy_to_device_ptr", "set_device_ptr", "f2py",
    "stride_tricks", "as_strided", "memmap", "fromfile", "load_module_from_file", "set_thread_number",
    "set_global_executor_config", "load_as_list", "load_as_dict",
))
_BLOCKED_RESULTS = (types.ModuleType, types.FrameType, types.CodeType, types.TracebackType)
GUEST_CLASSES: "weakref.WeakSet[type]" = weakref.WeakSet()
_NO_WRITE = (Namespace, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
             types.BuiltinMethodType, types.MappingProxyType)
_NO_WRITE_EXTRA: list[type] = []  # host API proxy types, registered by child.py


def _refuse(name: str) -> AttributeError:
    return AttributeError(f"access to attribute {name!r} is not allowed in the sandbox")


def guarded_getattr(obj: object, name: str, *default: object) -> object:
    if type(name) is not str:
        raise TypeError("attribute name must be a string")
    if name.startswith("_") and not (name == RAW_MNN_NAME and isinstance(obj, Namespace)):
        raise _refuse(name)
    if name in _DENIED_ATTRS:
        raise _refuse(name)
    if name in ("format", "format_map") and (isinstance(obj, str) or (isinstance(obj, type) and issubclass(obj, str))):
        return _checked_format(obj, name)  # str.format can walk attributes ("{0.__self__}"): check the template
    if name == "obj" and isinstance(obj, BaseException):
        raise _refuse(name)  # AttributeError.obj hands back the object that was probed
    if name == "dumps" and obj is not JSON_NS:
        raise _refuse(name)  # ndarray.dumps pickles
    try:
        value = getattr(obj, name)
    except AttributeError as exc:
        if default:
            return default[0]
        raise AttributeError(str(exc)) from None
    if isinstance(value, _BLOCKED_RESULTS):
        raise _refuse(name)
    return value


_FORMATTER = string.Formatter()


def _check_template(template: str) -> None:
    for _, field, spec, _ in _FORMATTER.parse(template):
        if field is not None and ("." in field or "[" in field):
            raise AttributeError(f"format field {field!r} is not allowed in the sandbox (no attribute or index access)")
        if spec:
            _check_template(spec)  # nested fields: "{:{width}}"


def _checked_format(obj: object, name: str) -> Callable:
    """str.format / format_map limited to plain fields ("{}", "{0}", "{name:.2f}")."""
    if isinstance(obj, str):
        def bound(*args, **kwargs):
            _check_template(obj)
            return getattr(obj, name)(*args, **kwargs)
        return bound

    def unbound(template, *args, **kwargs):
        _check_template(template)
        return getattr(str, name)(template, *args, **kwargs)
    return unbound


def guarded_hasattr(obj: object, name: str) -> bool:
    try:
        guarded_getattr(obj, name)
    except AttributeError:
        return False
    return True


def guarded_write(obj: object) -> object:
    """Attribute/item assignment target check: data objects yes, modules/functions/foreign classes no."""
    if isinstance(obj, _NO_WRITE) or isinstance(obj, tuple(_NO_WRITE_EXTRA)):
        raise TypeError(f"{type(obj).__name__} objects are read-only in the sandbox")
    if isinstance(obj, type) and obj not in GUEST_CLASSES:
        raise TypeError(f"class {obj.__name__!r} is read-only in the sandbox")
    return obj


def guarded_setattr(obj: object, name: str, value: object) -> None:
    if type(name) is not str or name.startswith("_"):
        raise _refuse(str(name))
    setattr(guarded_write(obj), name, value)


_INPLACE = {"+=": operator.iadd, "-=": operator.isub, "*=": operator.imul, "/=": operator.itruediv,
            "//=": operator.ifloordiv, "%=": operator.imod, "**=": operator.ipow, "<<=": operator.ilshift,
            ">>=": operator.irshift, "&=": operator.iand, "|=": operator.ior, "^=": operator.ixor,
            "@=": operator.imatmul}


def inplacevar(op: str, x: object, y: object) -> object:
    return _INPLACE[op](x, y)


def _apply(func: Callable, *args: object, **kwargs: object) -> object:
    return func(*args, **kwargs)


def _build_class(func, name, *bases, **kwargs):  # noqa: ANN001
    cls = builtins.__build_class__(func, name, *bases, **kwargs)
    GUEST_CLASSES.add(cls)
    return cls


_SAFE_BUILTIN_NAMES = (
    "abs all any ascii bin bool bytearray bytes callable chr complex dict dir divmod enumerate filter float "
    "format frozenset hash hex int isinstance issubclass iter len list map max min next object oct ord pow "
    "property range repr reversed round set slice sorted staticmethod classmethod str sum super tuple zip "
    "True False None NotImplemented Ellipsis "
    "BaseException Exception ArithmeticError AssertionError AttributeError EOFError FloatingPointError "
    "IndexError KeyError LookupError MemoryError NameError NotImplementedError OverflowError RecursionError "
    "RuntimeError StopIteration TypeError ValueError ZeroDivisionError UnicodeError Warning"
).split()


def base_builtins() -> dict:
    """Builtins shared by every run (the import hook and print are added per run)."""
    table = {n: getattr(builtins, n) for n in _SAFE_BUILTIN_NAMES}
    table.update(getattr=guarded_getattr, hasattr=guarded_hasattr, setattr=guarded_setattr,
                 __build_class__=_build_class)
    return table


BASE_BUILTINS = base_builtins()
BASE_GLOBALS = {
    "__metaclass__": type,
    "_getattr_": guarded_getattr,
    "_write_": guarded_write,
    "_getitem_": operator.getitem,
    "_getiter_": iter,
    "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
    "_unpack_sequence_": guarded_unpack_sequence,
    "_inplacevar_": inplacevar,
    "_apply_": _apply,
}


def precompile_shipped_tasks() -> int:
    """Fill _PRECOMPILED from the installed tasks folder (task files at their bundle paths, libraries
    at _lib/<name>/...). Only a speed-up: a file that does not compile here is left to the run."""
    try:
        marker = importlib.resources.files("walle.tasks") / "hello" / "task.toml"
        root = pathlib.Path(str(marker)).resolve().parent.parent
        paths = sorted(root.rglob("*.py"))
    except (ImportError, OSError, TypeError):
        return 0
    for path in paths:
        rel = path.relative_to(root).parts
        name = "/".join(rel if rel[0] == "_lib" else rel[1:])
        try:
            source = path.read_text()
            _PRECOMPILED[(name, source)] = compile_task(source, name)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
    return len(_PRECOMPILED)


def warm_up() -> None:
    """Run the lazy-import paths of numpy/MNN/RestrictedPython once, while files can still be opened."""
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    (a @ a.T).sum(), a.mean(), a.std(), np.linalg.svd(a), np.fft.fft(a[0]), np.random.default_rng(0).normal(size=3)
    repr(a), str(np.float64(1.5)), np.argsort(a[0]), np.unique(a), np.percentile(a, 50), np.concatenate([a, a])
    if MNN is not None:
        F = MNN.expr
        x = F.const(a, [3, 4])
        y = F._F.reduce_mean(F._F.sigmoid(x * 2.0 + 1.0), [], False)
        y.read().copy()
    compile_task("import numpy as np\ndef main(event):\n    print(np.zeros(2))\n    return 1\n", "<warm-up>")
    precompile_shipped_tasks()
