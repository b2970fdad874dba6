"""Which HetConv implementation runs: the backend registry and its selection.

Every backend computes the same function (HetConv, to rounding); they differ
only in speed. The choice is made, in this order of precedence, by

1. the ``backend=`` argument of a layer or of ``leanconv.functional.het_conv2d``,
2. the innermost ``with leanconv.use_backend(name):`` block,
3. the environment variable ``LEANCONV_BACKEND``,
4. ``"auto"``, which picks among the exact backends by device and shape.

``auto`` never picks anything that computes a different function: it only
chooses among registered backends, all of which are exact.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .autotune import heuristic_choice
from .hetconv_fused import hetconv_fused, hetconv_packed
from .hetconv_loop import hetconv_loop
from .hetconv_masked import hetconv_masked
from .hetconv_reference import hetconv_reference
from .hetconv_split import hetconv_split
from .triton_launch import TRITON_MISSING, triton_installed

__all__ = [
    "ENV_VAR",
    "HetConvBackend",
    "register_backend",
    "backend_names",
    "get_backend",
    "use_backend",
    "requested_backend",
    "choose_backend",
    "measured_candidates",
    "check_backend_name",
]

ENV_VAR = "LEANCONV_BACKEND"


@dataclass(frozen=True)
class HetConvBackend:
    """One exact implementation of HetConv.

    ``forward(x, weight, pointwise_weight, bias, stride, padding, dilation, p, layout)``
    takes an already padded-for-mode (B, M, H, W) input and zero padding.
    ``unsupported(x)`` returns None when the backend can run on ``x``, else a
    sentence saying why not.
    """

    name: str
    forward: Callable[..., torch.Tensor]
    unsupported: Callable[[torch.Tensor], str | None] = lambda x: None
    description: str = ""


_REGISTRY: dict[str, HetConvBackend] = {}


def register_backend(backend: HetConvBackend) -> None:
    """Add (or replace) a backend. Only exact implementations may be registered."""
    if backend.name == "auto":
        raise ValueError("'auto' is reserved for the automatic choice")
    _REGISTRY[backend.name] = backend


register_backend(HetConvBackend("reference", hetconv_reference, description="one dense conv with the materialised weight"))
register_backend(HetConvBackend("split", hetconv_split, description="grouped KxK conv + 1x1 conv on the other channels"))
register_backend(HetConvBackend("loop", hetconv_loop, description="P branches of KxK + 1x1 convs (baseline)"))
register_backend(HetConvBackend(
    "fused", hetconv_fused, description="channels-last grouped KxK conv, 1x1 part added in place by one GEMM (addmm_)"
))
register_backend(HetConvBackend(
    "masked", hetconv_masked,
    description="the seed computation made exact: grouped KxK conv + dense 1x1 conv with zero diagonal blocks, added in place",
))
register_backend(HetConvBackend(
    "packed", hetconv_packed,
    description="fused, with oneDNN-packed grouped weights and the add as a conv post-op (CPU inference; else fused)",
))




def _register_triton_lazily() -> None:
    """List ``triton`` where the package is installed, without importing it.

    ``ops/hetconv_triton.py`` (and Triton) are imported on the backend's first
    use; a broken Triton install then shows as the backend's ``unsupported`` reason.
    """
    if not triton_installed():
        return

    def forward(*args):
        from .hetconv_triton import hetconv_triton

        return hetconv_triton(*args)

    def unsupported(x: torch.Tensor) -> str | None:
        try:
            from .hetconv_triton import unsupported as kernel_unsupported
        except Exception as error:  # a broken install must not break auto
            return f"Triton is installed but could not be imported ({type(error).__name__}: {error})"
        return kernel_unsupported(x)

    register_backend(HetConvBackend(
        "triton", forward, unsupported,
        description="direct HetConv: Triton implicit-GEMM forward, input- and weight-gradient kernels (CUDA)",
    ))


_register_triton_lazily()


def backend_names() -> tuple[str, ...]:
    """All names accepted by ``backend=``: ``"auto"`` and the registered backends."""
    return ("auto", *_REGISTRY)


def check_backend_name(name: str | None, source: str = "backend") -> str | None:
    if name is None:
        return None
    if name == "triton" and name not in _REGISTRY:
        raise ValueError(f"{source}: {TRITON_MISSING}")
    if not isinstance(name, str) or (name != "auto" and name not in _REGISTRY):
        raise ValueError(f"{source} must be one of {backend_names()}, got {name!r}")
    return name


def get_backend(name: str) -> HetConvBackend:
    check_backend_name(name)
    if name == "auto":
        raise ValueError("'auto' is resolved by choose_backend(), it has no implementation of its own")
    return _REGISTRY[name]


_state = threading.local()


def _stack() -> list[str]:
    if not hasattr(_state, "stack"):
        _state.stack = []
    return _state.stack


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use backend ``name`` for every HetConv layer without an explicit ``backend=``
    inside the ``with`` block (thread-local, nestable)::

        with leanconv.use_backend("reference"):
            y = model(x)
    """
    check_backend_name(name)
    _stack().append(name)
    try:
        yield
    finally:
        _stack().pop()


def requested_backend(argument: str | None = None) -> str:
    """The backend name in force for a call: argument, context, environment, "auto"."""
    if argument is not None:
        return check_backend_name(argument)
    stack = _stack()
    if stack:
        return stack[-1]
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        return check_backend_name(from_env.strip(), source=f"environment variable {ENV_VAR}")
    return "auto"


def _triton_measured_win(x: torch.Tensor, weight: torch.Tensor, p: int) -> bool:
    """Where the ``triton`` backend beat ``split`` (auto's CUDA choice otherwise)
    forward and forward+backward on an H100, batch 128, channels_last
    (results/gpu/nvidia-h100-80gb-hbm3-hetconv-p4-b128.md): P=4, 3x3, bf16/fp16,
    128 <= M <= 256 input channels on maps of at most 28x28 (ResNet layer2/layer3
    shapes). Everywhere else measured (larger maps, 512 channels, TF32) split
    was as fast or faster, and unmeasured settings keep the old rule.
    """
    backend = _REGISTRY.get("triton")
    if backend is None or p != 4 or tuple(weight.shape[2:]) != (3, 3):
        return False
    if x.dtype not in (torch.bfloat16, torch.float16) or x.dim() != 4:
        return False
    in_channels, height, width = x.shape[1], x.shape[2], x.shape[3]
    if not (128 <= in_channels <= 256 and height * width <= 28 * 28):
        return False
    return backend.unsupported(x) is None


_warned: set[str] = set()


def warn_triton_skipped(reason: str) -> None:
    """Say once per process why ``auto`` leaves the Triton kernels out on a GPU."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"leanconv: the triton backends are skipped: {reason}", RuntimeWarning, stacklevel=3)


def triton_candidate(x: torch.Tensor) -> bool:
    """Whether the measuring ``auto`` times ``triton`` on ``x``: on CUDA tensors that
    the kernels accept (never on the CPU, where it runs only interpreted, for tests).
    Where Triton is missing or broken on a GPU, ``auto`` goes on without it and
    warns once."""
    if x.device.type not in TRITON_MEASURED_DEVICES:
        return False
    backend = _REGISTRY.get("triton")
    if backend is None:
        warn_triton_skipped(TRITON_MISSING)
        return False
    reason = backend.unsupported(x)
    if reason is not None and reason.startswith("Triton is installed but"):
        warn_triton_skipped(reason)
    return reason is None


TRITON_MEASURED_DEVICES = ("cuda",)


def measured_candidates(x: torch.Tensor, needs_grad: bool) -> tuple[str, ...]:
    """The backends the measuring ``auto`` times for input ``x``.

    reference, split, masked and fused everywhere; ``packed`` in CPU inference
    (oneDNN's packed weights); ``triton`` on CUDA where it accepts the input. In
    training on an NCHW input the fused form is left out: it converts the input
    and its gradient to channels-last and keeps the copies for backward, so a
    training step would need more memory than the dense layer's.
    """
    names = ["reference", "split", "masked", "fused"]
    if needs_grad and not x.is_contiguous(memory_format=torch.channels_last):
        names.remove("fused")
    if not needs_grad and x.device.type == "cpu":
        names.append("packed")
    if triton_candidate(x):
        names.append("triton")
    return tuple(names)


def _auto_choice(x: torch.Tensor, weight: torch.Tensor, p: int) -> str:
    """Deterministic choice by shape and device among the exact backends.

    The split form does M/P*K*K + M MACs per output element against the dense
    form's M*K*K; it is chosen when it does at most 80% of the dense work (the
    two library calls cost a second pass over memory, which a smaller saving
    does not pay for). On the CPU the rule is :func:`.autotune.heuristic_choice`;
    ``HetConv2d`` layers measure instead where :func:`.autotune.measuring_enabled`.
    """
    if p == 1:
        return "split"  # a plain convolution with the layer's own weight
    if x.device.type == "cuda" and _triton_measured_win(x, weight, p):
        return "triton"
    if x.device.type == "cpu":
        return heuristic_choice(x, weight, p)
    taps = weight.shape[2] * weight.shape[3]
    split_fraction = 1.0 / p + 1.0 / taps
    return "split" if split_fraction <= 0.8 else "reference"


def choose_backend(requested: str, x: torch.Tensor, weight: torch.Tensor, p: int) -> str:
    """Resolve ``requested`` ("auto" or a name) to the backend that will run."""
    if requested == "auto":
        return _auto_choice(x, weight, p)
    reason = get_backend(requested).unsupported(x)
    if reason is not None:
        raise ValueError(f"backend {requested!r} cannot run this input: {reason}")
    return requested
