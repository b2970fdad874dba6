"""The measuring ``auto``: time the exact backends on the real input once per
setting, then keep using the fastest.

Every candidate computes HetConv exactly (they are registered backends), so the
choice only affects speed. A setting is the key

    (device, dtype, memory format, input shape, weight shape, P, layout,
     stride, padding, dilation, bias?, training?)

where *training* means autograd will run a backward pass through the layer
(then forward + backward is timed on detached copies; nothing of the caller's
is touched). Results live in memory for the process, and in a JSON file when
``LEANCONV_AUTOTUNE_CACHE`` names one (its entries also record torch's version
and thread count, which are part of the key).

The same machinery serves the depthwise convolution's ``auto``
(:mod:`leanconv.ops.depthwise`, keys with a ``depthwise`` field). On a CUDA
device every candidate's run is followed by ``torch.cuda.synchronize()``, so
the clock sees the kernels, not their launch.

Measuring is off, and a deterministic rule decides (:func:`heuristic_choice` on
the CPU, the static rule of ``backends`` on a GPU), when

* ``LEANCONV_AUTOTUNE=0`` (``1``, the default, measures),
* the input is neither on the CPU nor on a CUDA device,
* the call is traced, scripted, compiled or exported (the choice must not depend
  on timing there), or a CUDA graph is being captured,
* the layer is small: fewer than ``MIN_MEASURED_MACS`` dense multiply-accumulates
  per call, where timing noise is larger than the differences and measuring would
  cost more than it saves,
* on the CPU, the dtype is not float32 or bfloat16 (oneDNN runs only those;
  float64 and float16 take ATen's generic paths, where the split form is the
  known best); on CUDA, not float32, bfloat16 or float16.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import warnings
from typing import Callable, Mapping

import torch

__all__ = [
    "AUTOTUNE_ENV",
    "autotune_generation",
    "autotune_tracing",
    "autocast_dtype",
    "stream_capturing",
    "needs_autograd",
    "layer_memo_key",
    "forward_backward",
    "CACHE_ENV",
    "MIN_MEASURED_MACS",
    "clear_cache",
    "heuristic_choice",
    "measuring_enabled",
    "measuring_allowed",
    "measured_choice",
    "tuning_key",
    "setting_key",
    "measured_device",
    "cache_entries",
    "synchronizer",
]

AUTOTUNE_ENV = "LEANCONV_AUTOTUNE"
CACHE_ENV = "LEANCONV_AUTOTUNE_CACHE"
MIN_MEASURED_MACS = 20_000_000
_FAST_DTYPES = (torch.float32, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_lock = threading.Lock()
_memory: dict[str, str] = {}
_disk_loaded: str | None = None
_generation = [0]


def _memory_format(x: torch.Tensor) -> str:
    if x.is_contiguous():
        return "contiguous"
    if x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided"


def dense_macs(x: torch.Tensor, weight: torch.Tensor, p: int, stride, padding, dilation) -> int:
    """MACs of the equivalent dense convolution for this call (B*Ho*Wo*N*M*kh*kw)."""
    from .conv_geometry import conv_output_size

    kh, kw = weight.shape[2], weight.shape[3]
    out_h = conv_output_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    out_w = conv_output_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    return x.shape[0] * max(out_h, 0) * max(out_w, 0) * weight.shape[0] * weight.shape[1] * p * kh * kw


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes in on ``x``'s device, or None when autocast is off:
    part of every key, since it, not ``x.dtype``, is what the kernels run in."""
    device_type = x.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def stream_capturing(x: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured on the current stream (no timing, no synchronize then)."""
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def needs_autograd(x: torch.Tensor, module: torch.nn.Module) -> bool:
    """Whether autograd will run a backward pass through ``module``'s call on ``x``."""
    return torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in module.parameters()))


def layer_memo_key(x: torch.Tensor, needs_grad: bool, padding) -> tuple:
    """What a layer's own memo of ``auto``'s choice is keyed on: the input's device,
    shape, dtype, autocast dtype and memory format, training, padding, and
    :func:`autotune_generation` (the layer's weights and geometry are its own)."""
    return (
        x.device, tuple(x.shape), x.dtype, autocast_dtype(x), x.is_contiguous(),
        x.is_contiguous(memory_format=torch.channels_last), needs_grad, padding, autotune_generation(),
    )


def forward_backward(forward: Callable[..., torch.Tensor], tensors) -> Callable[[], None]:
    """A candidate for :func:`measured_choice` in training: ``forward`` on detached
    copies of ``tensors`` (None kept as None) and the backward to all of them; the
    caller's tensors and gradients are untouched."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    inputs = [t for t in leaves if t is not None]

    def run() -> None:
        with torch.enable_grad():
            out = forward(*leaves)
            torch.autograd.grad(out, inputs, torch.ones_like(out))

    return run


def autotune_tracing() -> bool:
    """True while TorchScript traces/scripts or torch.compile / torch.export
    (and so both ONNX exporters) capture a graph: no measuring then."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()


def autotune_generation() -> tuple:
    """Everything besides the input that a remembered choice depends on: the
    environment switches, the thread count and how often the cache was cleared.
    Layers put it in the key of their per-layer memo."""
    return (os.environ.get(AUTOTUNE_ENV), os.environ.get(CACHE_ENV), torch.get_num_threads(), _generation[0])


def measuring_allowed(x: torch.Tensor) -> bool:
    """The switches every measuring ``auto`` obeys: ``LEANCONV_AUTOTUNE`` is not off,
    and no graph is being traced, compiled or captured."""
    if os.environ.get(AUTOTUNE_ENV, "1").strip() in ("0", "off", "false", "no"):
        return False
    return not (autotune_tracing() or stream_capturing(x))


def measuring_enabled(x: torch.Tensor, weight: torch.Tensor, p: int, stride, padding, dilation) -> bool:
    """The deterministic rule deciding whether ``auto`` measures this call (see module docstring)."""
    if not measured_device(x) or p == 1 or not measuring_allowed(x):
        return False
    return dense_macs(x, weight, p, stride, padding, dilation) >= MIN_MEASURED_MACS


def measured_device(x: torch.Tensor) -> bool:
    """Whether ``auto`` may measure on ``x``'s device and dtype (module docstring)."""
    if x.device.type == "cpu":
        return x.dtype in _FAST_DTYPES
    return x.device.type == "cuda" and x.dtype in _CUDA_DTYPES


def heuristic_choice(x: torch.Tensor, weight: torch.Tensor, p: int) -> str:
    """The CPU choice without measuring, from the size, work fraction and dtype
    (the same for inference and training).

    * Small calls (under ``MIN_MEASURED_MACS`` dense MACs, taking the output as
      large as the input): one dense convolution; fixed per-call costs (a second
      library call, layout changes) outweigh the saved MACs there.
    * The decomposed forms do (M/P*K*K + M) MACs per output element against the
      dense form's M*K*K; above 80% of the dense work the dense convolution wins.
    * Where oneDNN does not run the dtype (float64, float16), or while a graph is
      traced or compiled (TorchScript, torch.compile, torch.export, ONNX export):
      split, plain grouped conv + 1x1 conv + add without in-place writes.
    * Otherwise masked: the public seed computation (grouped conv + dense 1x1
      conv) with the 1x1 weight's diagonal blocks held at zero, in inference on
      channels-last inputs with the grouped conv adding itself onto the 1x1
      result as oneDNN's post-op. In benchmarks/cpu_forms.py (inference, batch
      64, the VGG-16-CIFAR shapes at P = 4 and 8) it was faster than the fused
      form at all ten shapes; in training it is the seed form's own computation,
      which the fused form's GEMM backward did not beat in the whole model (see
      docs/performance.md). It needs no layout conversion, so it also serves NCHW
      inputs, and its training step keeps no more memory than the seed form's.
    """
    if p == 1:
        return "split"  # a plain convolution with the layer's own weight
    taps = weight.shape[2] * weight.shape[3]
    upper_macs = x.shape[0] * x.shape[2] * x.shape[3] * weight.shape[0] * weight.shape[1] * p * taps
    if upper_macs < MIN_MEASURED_MACS or 1.0 / p + 1.0 / taps > 0.8:
        return "reference"
    if x.dtype not in _FAST_DTYPES or autotune_tracing():
        return "split"
    return "masked"


def setting_key(x: torch.Tensor, *fields, has_bias: bool, needs_grad: bool) -> str:
    """The cache key of one setting: device (with its name on CUDA), dtype, autocast
    dtype, memory format, input shape, the caller's ``fields``, bias, training,
    torch version, thread count."""
    device = x.device.type
    if device == "cuda":
        device += ":" + torch.cuda.get_device_name(x.device).replace(" ", "_")
    return "|".join(
        str(v)
        for v in (
            device, str(x.dtype).replace("torch.", ""), f"autocast-{autocast_dtype(x)}".replace("torch.", ""),
            _memory_format(x), tuple(x.shape), *fields,
            "bias" if has_bias else "nobias", "train" if needs_grad else "infer",
            f"torch{torch.__version__}", f"threads{torch.get_num_threads()}",
        )
    )


def tuning_key(x, weight, p, layout, stride, padding, dilation, has_bias, needs_grad) -> str:
    """HetConv's key (:func:`setting_key` with the weight shape, P, layout and geometry)."""
    return setting_key(
        x, tuple(weight.shape), p, layout, tuple(stride), tuple(padding), tuple(dilation),
        has_bias=has_bias, needs_grad=needs_grad,
    )


def _disk_path() -> str | None:
    path = os.environ.get(CACHE_ENV, "").strip()
    return path or None


def _load_disk(path: str) -> None:
    global _disk_loaded
    if _disk_loaded == path:
        return
    _disk_loaded = path
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
    """Merge one entry into the JSON file, atomically (write a temporary file, rename)."""
    try:
        with open(path) as handle:
            stored = json.load(handle)
        if not isinstance(stored, dict):
            stored = {}
    except (OSError, ValueError):
        stored = {}
    stored[key] = {"choice": choice, "median_seconds": {k: round(v, 9) for k, v in timings.items()}}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".autotune-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(stored, handle, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cache_entries() -> dict[str, str]:
    """A copy of the in-memory cache: key -> chosen backend."""
    with _lock:
        return dict(_memory)


def clear_cache() -> None:
    """Forget every measured choice (the file named by LEANCONV_AUTOTUNE_CACHE is kept)."""
    global _disk_loaded
    with _lock:
        _memory.clear()
        _disk_loaded = None
        _generation[0] += 1


def _runnable(candidates: Mapping[str, Callable[[], object]]) -> dict[str, Callable[[], object]]:
    """Run each candidate once (the warm-up) and keep those that ran. A backend that
    fails on this device or input (say, a kernel that does not compile for this
    GPU) is left out with a warning naming it, rather than failing the caller's
    call: every other candidate computes the same function. If all fail, the last
    error is raised."""
    kept, error = {}, None
    for name, run in candidates.items():
        try:
            run()
        except Exception as caught:  # noqa: BLE001 - reported, and the exact alternatives remain
            error = caught
            warnings.warn(
                f"leanconv auto: backend {name!r} failed while being measured and is not used for this "
                f"setting ({type(caught).__name__}: {str(caught)[:300]})",
                RuntimeWarning, stacklevel=4,
            )
            continue
        kept[name] = run
    if not kept and error is not None:
        raise error
    return kept


def _time_candidates(candidates: Mapping[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Fastest seconds per candidate over ``rounds`` interleaved rounds after one warm-up each
    (the minimum: other processes only ever add time, so it is the least noisy estimate)."""
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
    rounds: int = 3,
    prefer: str | None = None,
    margin: float = 0.02,
    synchronize: Callable[[], object] | None = None,
) -> str:
    """The fastest of ``candidates`` (name -> zero-argument callable running it
    once) for ``key``: measured on first sight, then remembered.

    ``prefer`` (the heuristic's choice) is kept unless another candidate is
    faster by more than ``margin`` (2%): on a busy machine a lucky sample of a
    worse candidate must not win. (5% kept masked at 0.88x of nn.Conv2d where
    reference ran at 0.97x: VGG-16-CIFAR's 64-channel 32x32 layer, P=16, NCHW
    training, results/cpu/amd-epyc-2t-layers-vgg-b64 of commit 658aeda.)

    ``synchronize`` (``torch.cuda.synchronize`` for CUDA inputs) is called before
    timing and after every run, so asynchronous kernels are timed whole."""
    path = _disk_path()
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


def synchronizer(x: torch.Tensor) -> Callable[[], object] | None:
    """What :func:`measured_choice` must call to time work on ``x``'s device (None on the CPU)."""
    if x.device.type == "cuda":
        return lambda: torch.cuda.synchronize(x.device)
    return None


def rounds_for(macs: int) -> int:
    """Timed rounds per candidate: 5 for light layers, 3 for heavy ones."""
    return 5 if macs < 200_000_000 else 3

