"""The deployment reference: the same exported graph timed in OpenVINO and onnxruntime,
each runtime in a process of its own (``runtime_worker.py``), for whole-model rows.

Usage: export each model once (:func:`leanconv.export.export_onnx`, dynamic batch), then
:func:`time_in_runtime` with one :class:`RuntimeJob` per (model, input); every job's
output is checked against the PyTorch output the caller gives before its times count.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from .timing import Timing

__all__ = ["RUNTIMES", "RuntimeJob", "RuntimeResult", "why_runtime_unavailable", "time_in_runtime",
           "check_runtime_names"]

RUNTIMES = ("openvino", "onnxruntime")
_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtime_worker.py")
_INSTALL = {"openvino": "pip install openvino", "onnxruntime": "pip install 'leanconv[onnx]'"}


def check_runtime_names(names) -> list[str]:
    """``names`` (a list, or a comma-separated string) as a list of known runtimes; a
    ValueError names an unknown one."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown:
        raise ValueError(f"runtimes must be among {RUNTIMES}, got {unknown}")
    return list(names)


def why_runtime_unavailable(name: str) -> str | None:
    """Why ``name`` cannot run here (not installed), or None."""
    check_runtime_names([name])
    if importlib.util.find_spec(name) is None:
        return f"{name} is not installed ({_INSTALL[name]})"
    return None


@dataclass(frozen=True)
class RuntimeJob:
    """One timed call: ``key`` names it, ``onnx`` is the graph's path, ``input`` the
    batch, ``expected`` PyTorch's output on it (the correctness gate)."""

    key: str
    onnx: str
    input: torch.Tensor
    expected: torch.Tensor


@dataclass(frozen=True)
class RuntimeResult:
    """A job's times (seconds per call) and the gate's max |runtime - torch| and tolerance."""

    timing: Timing
    max_abs_diff: float
    tolerance: float
    load_s: float
    version: str


def time_in_runtime(runtime: str, jobs: list[RuntimeJob], *, threads: int, warmup: int = 3, repeats: int = 5,
                    block_seconds: float = 0.05, timeout: float = 1800.0) -> dict[str, RuntimeResult]:
    """Time ``jobs`` in ``runtime`` in a fresh process with ``threads`` threads (module
    docstring); a RuntimeError where the worker fails or an output misses its gate
    (max |diff| <= 1e-4 * max |torch| + 1e-5)."""
    why = why_runtime_unavailable(runtime)
    if why:
        raise RuntimeError(why)
    with tempfile.TemporaryDirectory(prefix=f"leanconv-{runtime}-") as folder:
        items = []
        for index, job in enumerate(jobs):
            source = os.path.join(folder, f"in{index}.npy")
            np.save(source, job.input.detach().contiguous().cpu().numpy())
            items.append({"key": job.key, "onnx": os.fspath(job.onnx), "input": source,
                          "output": os.path.join(folder, f"out{index}.npy")})
        job_path, result_path = os.path.join(folder, "job.json"), os.path.join(folder, "result.json")
        with open(job_path, "w") as handle:
            json.dump({"runtime": runtime, "threads": threads, "warmup": warmup, "repeats": repeats,
                       "block_seconds": block_seconds, "jobs": items}, handle)
        environment = dict(os.environ, OMP_NUM_THREADS=str(threads))
        finished = subprocess.run([sys.executable, _WORKER, job_path, result_path], capture_output=True, text=True,
                                  timeout=timeout, env=environment)
        if finished.returncode != 0:
            raise RuntimeError(f"the {runtime} worker failed (exit {finished.returncode}):\n{finished.stderr[-2000:]}")
        with open(result_path) as handle:
            result = json.load(handle)
        results = {}
        for job, item in zip(jobs, items):
            out = torch.from_numpy(np.load(item["output"]))
            expected = job.expected.detach().cpu()
            error = (out - expected).abs().max().item()
            tolerance = 1e-4 * expected.abs().max().item() + 1e-5
            if not error <= tolerance:
                raise RuntimeError(f"{runtime} computes {job.key} differently from PyTorch: "
                                   f"max |diff| {error:.3g} > {tolerance:.3g}")
            results[job.key] = RuntimeResult(Timing.from_samples(result["samples"][job.key]), error, tolerance,
                                             result["load_s"][job.key], result["version"])
        return results
