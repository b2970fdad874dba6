"""The opt-in measuring ``auto``: time the backends that can run a call once per
setting, then keep the fastest (like ``torch.backends.cudnn.benchmark``).

Off by default: ``leanconv.config.set_benchmark(True)``, ``with
leanconv.config.benchmarking():`` or ``LEANCONV_BENCHMARK=1`` turn it on. A
setting is the key

    (op, device (and GPU name), dtype, autocast dtype, memory format, input shape,
     the layer's geometry, bias?, training?, torch version, threads)

where *training* means autograd will run a backward pass through the call (then
forward + backward is timed on detached copies; nothing of the caller's is
touched). Choices live in memory for the process, and in a JSON file when
``LEANCONV_BENCHMARK_CACHE`` (or ``leanconv.config.set_benchmark_cache``) names
one. The rule's choice is kept unless another backend is faster by more than
``margin`` (2%), so a lucky sample on a busy machine does not win. On a CUDA
device every run is followed by a synchronize, so the clock sees the kernels.

Measuring never happens while a graph is traced, compiled or exported, nor
while a CUDA graph is captured: the rule decides there.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from typing import Callable, Mapping

import torch

from .. import config
from ..files import write_atomic

__all__ = ["setting_key", "measured_choice", "forward_backward", "synchronizer", "cache_entries", "clear_cache"]

_lock = threading.Lock()
_memory: dict[str, str] = {}
_disk_loaded: list[str | None] = [None]


def setting_key(op: str, x: torch.Tensor, plan, *fields) -> str:
    """The cache key of one setting (module docstring)."""
    device = x.device.type
    if device == "cuda":
        device += ":" + torch.cuda.get_device_name(x.device).replace(" ", "_")
    return "|".join(
        str(v).replace("torch.", "")
        for v in (
            op, device, x.dtype, f"compute-{plan.compute_dtype}",
            "channels_last" if plan.channels_last else "contiguous", tuple(x.shape), *fields,
            "train" if plan.training else "infer", f"torch{torch.__version__}", f"threads{torch.get_num_threads()}",
        )
    )


def forward_backward(forward: Callable[..., torch.Tensor], tensors) -> Callable[[], None]:
    """A training candidate: ``forward`` on detached copies of ``tensors`` (None kept
    as None) and the backward to all of them; the caller's tensors are untouched."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    inputs = [t for t in leaves if t is not None]

    def run() -> None:
        with torch.enable_grad():
            out = forward(*leaves)
            torch.autograd.grad(out, inputs, torch.ones_like(out))

    return run


def synchronizer(x: torch.Tensor) -> Callable[[], object] | None:
    """What must be called to time work on ``x``'s device (None on the CPU)."""
    if x.device.type == "cuda":
        return lambda: torch.cuda.synchronize(x.device)
    return None


def _load_disk(path: str) -> None:
    if _disk_loaded[0] == path:
        return
    _disk_loaded[0] = path
    try:
        with open(path) as handle:
            stored = json.load(handle)
    except (OSError, ValueError):
        return
    if isinstance(stored, dict):
        for key, entry in stored.items():
            if isinstance(entry, dict) and isinstance(entry.get("choice"), str):
                _memory.setdefault(key, entry["choice"])


def _save_disk(path: str, key: str, choice: str, timings: Mapping[str, float]) -> None:
    """Merge one entry into the JSON file (atomically)."""
    try:
        with open(path) as handle:
            stored = json.load(handle)
        if not isinstance(stored, dict):
            stored = {}
    except (OSError, ValueError):
        stored = {}
    stored[key] = {"choice": choice, "median_seconds": {k: round(v, 9) for k, v in timings.items()}}
    try:
        write_atomic(path, json.dumps(stored, indent=1, sort_keys=True))
    except OSError as error:
        warnings.warn(f"leanconv: could not write the benchmark cache {path!r}: {error}", RuntimeWarning, stacklevel=4)


def cache_entries() -> dict[str, str]:
    """A copy of the in-memory choices: key -> backend."""
    with _lock:
        return dict(_memory)


def clear_cache() -> None:
    """Forget every measured choice (a cache file is kept) and make layers re-plan."""
    with _lock:
        _memory.clear()
        _disk_loaded[0] = None
    config.generation[0] += 1


def _runnable(candidates: Mapping[str, Callable[[], object]]) -> dict[str, Callable[[], object]]:
    """Run each candidate once (the warm-up) and keep those that ran; a backend that
    fails (say, a kernel that does not compile for this GPU) is left out with a
    warning naming it. If all fail, the last error is raised."""
    kept, error = {}, None
    for name, run in candidates.items():
        try:
            run()
        except Exception as caught:  # noqa: BLE001 - reported; the exact alternatives remain
            error = caught
            warnings.warn(
                f"leanconv benchmark: backend {name!r} failed while being measured and is not used for this "
                f"setting ({type(caught).__name__}: {str(caught)[:300]})",
                RuntimeWarning, stacklevel=5,
            )
            continue
        kept[name] = run
    if not kept and error is not None:
        raise error
    return kept


def _time_candidates(candidates: Mapping[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Fastest seconds per candidate over ``rounds`` interleaved rounds after one warm-up each."""
    candidates = _runnable(candidates)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: min(times) for name, times in samples.items()}


def measured_choice(
    key: str,
    candidates: Mapping[str, Callable[[], object]],
    *,
    prefer: str,
    rounds: int = 3,
    margin: float = 0.02,
    synchronize: Callable[[], object] | None = None,
) -> str:
    """The fastest of ``candidates`` (name -> zero-argument callable) for ``key``:
    measured on first sight, then remembered; ``prefer`` (the rule's choice) is
    kept unless another is faster by more than ``margin``."""
    path = config.benchmark_cache()
    with _lock:
        if path is not None:
            _load_disk(path)
        known = _memory.get(key)
    if known is not None and known in candidates:
        return known
    if synchronize is not None:
        synchronize()
        candidates = {name: _synchronized(run, synchronize) for name, run in candidates.items()}
    timings = _time_candidates(candidates, rounds)
    choice = min(timings, key=lambda name: (timings[name], name))
    if prefer in timings and timings[choice] > timings[prefer] * (1.0 - margin):
        choice = prefer
    with _lock:
        _memory[key] = choice
        if path is not None:
            _save_disk(path, key, choice, timings)
    return choice


def _synchronized(run: Callable[[], object], synchronize: Callable[[], object]) -> Callable[[], None]:
    def run_and_wait() -> None:
        run()
        synchronize()

    return run_and_wait
