"""The zygote's compile cache for task code shipped with the host (device_host/sandbox/policy.py)."""
import pathlib

import pytest

from walle.device_host.sandbox import policy


def test_shipped_task_code_is_precompiled_and_a_changed_file_is_compiled_afresh():
    """The zygote's compile cache is keyed by path and exact text: a hot-deployed edit never runs
    stale code, and a policy violation in it is still refused."""
    assert policy.precompile_shipped_tasks() >= 4
    lib = pathlib.Path(__file__).resolve().parents[2] / "tasks" / "_lib" / "coda" / "metrics.py"
    src = lib.read_text()
    assert policy.compile_task(src, "_lib/coda/metrics.py") is policy.compile_task(src, "_lib/coda/metrics.py")
    changed = policy.compile_task(src + "\nVALUE = 3\n", "_lib/coda/metrics.py")
    assert changed is not policy.compile_task(src, "_lib/coda/metrics.py")
    assert policy.compile_task(src, "elsewhere/metrics.py") is not policy.compile_task(src, "_lib/coda/metrics.py")
    with pytest.raises(SyntaxError, match="_secret"):
        policy.compile_task(src + "\n_secret = 1\n", "_lib/coda/metrics.py")
