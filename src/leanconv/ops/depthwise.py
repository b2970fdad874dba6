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

import os

import torch
import torch.nn.functional as F

from .autotune import (
    MIN_MEASURED_MACS,
    forward_backward,
    measured_choice,
    measuring_allowed,
    setting_key,
    synchronizer,
)
from .conv_geometry import conv_output_size
from .triton_launch import TRITON_MISSING, triton_installed

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


def depthwise_backend_names() -> tuple[str, ...]:
    """Names accepted by ``backend=`` of DepthwiseConv2d: auto, torch, and triton where installed."""
    return ("auto", "torch") + (("triton",) if triton_installed() else ())


def check_depthwise_backend(name: str | None, source: str = "backend") -> str | None:
    if name is None:
        return None
    if name == "triton" and not triton_installed():
        raise ValueError(f"{source}: {TRITON_MISSING}")
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
    if not triton_installed():
        return TRITON_MISSING
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
    if x.device.type not in MEASURED_DEVICES or macs < MIN_MEASURED_MACS or not measuring_allowed(x):
        return False
    reason = depthwise_unsupported(x)
    if reason is not None and (reason == TRITON_MISSING or reason.startswith("Triton is installed but")):
        from .backends import warn_triton_skipped

        warn_triton_skipped(reason)
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
    out_h, out_w = (conv_output_size(x.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i])
                    for i in (0, 1))
    macs = x.shape[0] * max(out_h, 0) * max(out_w, 0) * weight.shape[0] * weight.shape[2] * weight.shape[3]
    if not _measuring(x, macs):
        return "torch"
    key = setting_key(
        x, "depthwise", tuple(weight.shape), tuple(stride), tuple(padding), tuple(dilation),
        has_bias=bias is not None, needs_grad=needs_grad,
    )
    if needs_grad:
        def candidate(name):
            return forward_backward(
                lambda x, weight, bias: depthwise_conv2d(x, weight, bias, stride, padding, dilation, name),
                (x, weight, bias),
            )
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
