"""Which implementation runs a depthwise KxK convolution (the spatial part of
DSConv2d, BSConvU2d and BSConvS2d).

Backends, all computing ``F.conv2d(x, weight, bias, stride, padding, dilation,
groups=C)``:

* ``torch``: ``F.conv2d`` (cuDNN on a GPU, oneDNN on the CPU): the reference.
* ``triton``: the direct kernels of ``kernels/depthwise.py`` (forward, input and
  weight gradient), where Triton is installed; CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1`` (tests).

The choice, in order of precedence: the layer's ``backend=`` argument, the
environment variable ``LEANCONV_DEPTHWISE_BACKEND``, else ``auto``. ``auto``
runs ``torch`` except on a CUDA device where measuring is enabled
(:func:`leanconv.ops.autotune.measuring_enabled`'s switches: ``LEANCONV_AUTOTUNE``,
not while tracing, compiling or capturing a CUDA graph, at least ``MIN_MEASURED_MACS`` per call): there
it times both once per setting (inference, or forward + backward when autograd
will run) and keeps ``triton`` only where it was faster on that GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from .autotune import (
    AUTOTUNE_ENV,
    MIN_MEASURED_MACS,
    autotune_tracing,
    measured_choice,
    stream_capturing,
    setting_key,
    synchronizer,
)

__all__ = [
    "DEPTHWISE_ENV",
    "depthwise_backend_names",
    "check_depthwise_backend",
    "requested_depthwise_backend",
    "depthwise_unsupported",
    "depthwise_conv2d",
    "choose_depthwise_backend",
]

DEPTHWISE_ENV = "LEANCONV_DEPTHWISE_BACKEND"
# Devices where ``auto`` measures ``triton`` against ``torch`` (the CPU runs Triton only interpreted).
MEASURED_DEVICES = ("cuda",)


def _triton_found() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def depthwise_backend_names() -> tuple[str, ...]:
    """Names accepted by ``backend=`` of DepthwiseConv2d: auto, torch, and triton where installed."""
    return ("auto", "torch") + (("triton",) if _triton_found() else ())


def check_depthwise_backend(name: str | None, source: str = "backend") -> str | None:
    if name is None:
        return None
    if name == "triton" and not _triton_found():
        raise ValueError(
            f"{source}: backend 'triton' needs the Triton package, which is not installed here "
            "(pip install 'leanconv[triton]')"
        )
    if not isinstance(name, str) or name not in depthwise_backend_names():
        raise ValueError(f"{source} must be one of {depthwise_backend_names()}, got {name!r}")
    return name


def requested_depthwise_backend(argument: str | None) -> str:
    """The backend in force: the argument, else ``LEANCONV_DEPTHWISE_BACKEND``, else ``auto``."""
    if argument is not None:
        return check_depthwise_backend(argument)
    from_env = os.environ.get(DEPTHWISE_ENV, "").strip()
    if from_env:
        return check_depthwise_backend(from_env, source=f"environment variable {DEPTHWISE_ENV}")
    return "auto"


def depthwise_unsupported(x: torch.Tensor) -> str | None:
    """None when the ``triton`` depthwise backend can run on ``x``, else why not."""
    if not _triton_found():
        return "Triton is not installed"
    try:
        from .depthwise_triton import unsupported
    except Exception as error:  # a broken install must not break auto
        return f"Triton is installed but could not be imported ({type(error).__name__}: {error})"
    return unsupported(x)


def depthwise_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    backend: str = "torch",
) -> torch.Tensor:
    """Depthwise convolution (groups = x.shape[1]) of a (B, C, H, W) input with a
    (C*D, 1, KH, KW) weight and symmetric zero padding, by ``backend`` ("torch" or "triton")."""
    if backend == "torch":
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups=x.shape[1])
    if backend == "triton":
        reason = depthwise_unsupported(x)
        if reason is not None:
            raise ValueError(f"depthwise backend 'triton' cannot run this input: {reason}")
        from .depthwise_triton import depthwise_triton

        return depthwise_triton(x, weight, bias, stride, padding, dilation)
    raise ValueError(f"backend must be 'torch' or 'triton' here ('auto' is resolved first), got {backend!r}")


def _measuring(x: torch.Tensor, macs: int) -> bool:
    if os.environ.get(AUTOTUNE_ENV, "1").strip() in ("0", "off", "false", "no"):
        return False
    if x.device.type not in MEASURED_DEVICES or autotune_tracing() or stream_capturing(x) or macs < MIN_MEASURED_MACS:
        return False
    reason = depthwise_unsupported(x)
    if reason is not None and reason.startswith(("Triton is not installed", "Triton is installed but")):
        from .backends import TRITON_MISSING, warn_triton_skipped

        warn_triton_skipped(TRITON_MISSING if reason.startswith("Triton is not") else reason)
    return reason is None


def choose_depthwise_backend(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    needs_grad: bool,
) -> str:
    """``auto`` for one call: ``torch``, or the faster of ``torch`` and ``triton``
    measured on this setting (module docstring)."""
    out_h = (x.shape[2] + 2 * padding[0] - dilation[0] * (weight.shape[2] - 1) - 1) // stride[0] + 1
    out_w = (x.shape[3] + 2 * padding[1] - dilation[1] * (weight.shape[3] - 1) - 1) // stride[1] + 1
    macs = x.shape[0] * max(out_h, 0) * max(out_w, 0) * weight.shape[0] * weight.shape[2] * weight.shape[3]
    if not _measuring(x, macs):
        return "torch"
    key = setting_key(
        x, "depthwise", tuple(weight.shape), tuple(stride), tuple(padding), tuple(dilation),
        has_bias=bias is not None, needs_grad=needs_grad,
    )
    if needs_grad:
        leaves = [t.detach().requires_grad_() for t in (x, weight)]
        if bias is not None:
            leaves.append(bias.detach().requires_grad_())

        def candidate(name):
            def run():
                with torch.enable_grad():
                    out = depthwise_conv2d(leaves[0], leaves[1], leaves[2] if bias is not None else None,
                                           stride, padding, dilation, name)
                    torch.autograd.grad(out, leaves, torch.ones_like(out))
            return run
    else:
        def candidate(name):
            def run():
                with torch.no_grad():
                    depthwise_conv2d(x, weight, bias, stride, padding, dilation, name)
            return run

    return measured_choice(
        key, {name: candidate(name) for name in ("torch", "triton")}, rounds=5, prefer="torch",
        synchronize=synchronizer(x),
    )
