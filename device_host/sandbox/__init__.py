"""Sandboxed task interpreter for the device host.

Task bundles (``dict`` of relative path -> source) run in a fresh fork of a pre-warmed zygote under
rlimits + seccomp-BPF + Landlock (where the probe finds them) + RestrictedPython with curated namespaces.
See runner.Sandbox for the API and policy.py for what task scripts may use.

Task-script convention: the entry script defines ``def main(event):`` returning a JSON-able value. It may
``import numpy as np, math, json, random, MNN`` (``MNN.expr/nn/optim``; raw bindings as ``F._F`` or
``F.raw``), other ``.py`` files of the bundle, and ``from walle import storage, model, tunnel, events, log``.
``storage.get("runs", 0)`` sends ``{"call": "storage.get", "args": [...], "kwargs": {...}}`` to the host,
whose ``api_handler(op, args, kwargs)`` answers; errors raise ``walle.HostAPIError`` in the task.
Arguments and results are JSON; numpy arrays cross as a tagged base64 object and come back as arrays.
"""
from .runner import Limits, RunResult, Sandbox, STATUSES

__all__ = ["Limits", "RunResult", "Sandbox", "STATUSES"]
