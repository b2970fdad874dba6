"""What the Triton launchers (``hetconv_triton.py``, ``depthwise_triton.py``) share:
the input checks, the geometry checks, NHWC strides, output allocation and how
the autograd Functions are applied. Imports no Triton itself.

The kernels index within one image, and pixels within one launch, in int32; the
checks here refuse what would overflow that, and what ``F.conv2d`` refuses
(non-positive output sizes, negative padding, zero stride or dilation), with
messages that name the argument.
"""

from __future__ import annotations

import importlib.util
import operator
import os

import torch

from .conv_geometry import conv_output_size

__all__ = [
    "SUPPORTED_DTYPES",
    "triton_installed",
    "TRITON_MISSING",
    "interpreted",
    "device_unsupported",
    "cast_and_check",
    "output_size",
    "int_pair",
    "strides_nhwc",
    "empty_like_format",
    "cdiv",
    "apply_function",
]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT32 = 2**31


TRITON_MISSING = (
    "the triton backends need the Triton package, which is not installed here "
    "(pip install 'leanconv[triton]'; it runs on CUDA GPUs, or on the CPU under TRITON_INTERPRET=1)"
)


def triton_installed() -> bool:
    """Whether the Triton package can be found (without importing it; once imported,
    ``find_spec`` answers from ``sys.modules``)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_unsupported(x: torch.Tensor, backend: str) -> str | None:
    """None when Triton kernels can run on ``x``, else the reason (a sentence naming ``backend``)."""
    if x.device.type != "cuda" and not (x.device.type == "cpu" and interpreted()):
        return f"the {backend} backend needs a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1), got {x.device}"
    if x.dtype not in SUPPORTED_DTYPES and not (torch.is_autocast_enabled(x.device.type) and x.dtype == torch.float32):
        return f"the {backend} backend supports {', '.join(map(str, SUPPORTED_DTYPES))}, got {x.dtype}"
    if x.dim() != 4:
        return f"the {backend} backend takes a 4-D (B, C, H, W) input, got {x.dim()}-D"
    if x.shape[1] * x.shape[2] * x.shape[3] >= _INT32:
        return "one image has 2**31 elements or more (the kernels index within an image in int32)"
    return None


def cast_and_check(x: torch.Tensor, backend: str, **tensors: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Refuse inputs the kernels cannot run; under autocast cast ``x`` and every
    tensor to its dtype; then every tensor must match ``x``'s dtype and device.
    Returns ``(x, *tensors.values())``, each contiguous except ``x``."""
    reason = device_unsupported(x, backend)
    if reason is not None:
        raise ValueError(reason)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x = x.to(dtype)
        tensors = {name: t.to(dtype) if t is not None else None for name, t in tensors.items()}
    for name, tensor in tensors.items():
        if tensor is not None and tensor.dtype != x.dtype:
            raise TypeError(f"{backend} backend: input is {x.dtype} but {name} is {tensor.dtype}")
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{backend} backend: input is on {x.device} but {name} is on {tensor.device}")
    return (x, *(t.contiguous() if t is not None else None for t in tensors.values()))


def output_size(
    x: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    out_channels: int,
) -> tuple[int, int]:
    """(Ho, Wo) of the convolution, after checking the geometry as ``F.conv2d`` does
    and that the kernels' int32 indices cannot overflow."""
    for name, value, least in (
        ("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1),
    ):
        try:
            pair = [operator.index(v) for v in value]
        except TypeError:
            pair = None
        if pair is None or len(pair) != 2 or min(pair) < least:
            raise ValueError(f"{name} must be a pair of ints >= {least}, got {tuple(value)!r}")
    sizes = []
    for axis, (size, k, s, p, d) in enumerate(zip(x.shape[2:], kernel_size, stride, padding, dilation)):
        out = conv_output_size(size, k, s, p, d)
        if out <= 0:
            raise ValueError(
                f"input {'height' if axis == 0 else 'width'} {size} with padding {p} is smaller than the "
                f"kernel's reach {d * (k - 1) + 1} (kernel_size {k}, dilation {d}): the output would be empty"
            )
        sizes.append(out)
    out_h, out_w = sizes
    if out_channels * out_h * out_w >= _INT32 or x.shape[0] * max(out_h * out_w, x.shape[2] * x.shape[3]) >= _INT32:
        raise ValueError("the output of one image, or the pixels of the batch, reach 2**31 (int32 indices)")
    return out_h, out_w


def int_pair(value) -> tuple[int, ...]:
    """A geometry pair as Python ints (numpy or other integer types too), as the kernels take them."""
    return tuple(operator.index(v) for v in value)


def strides_nhwc(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, row, column, channel) strides of a (B, C, H, W) tensor, as the kernels take them."""
    sb, sc, sh, sw = t.stride()
    return sb, sh, sw, sc


def empty_like_format(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty tensor of ``shape`` in ``like``'s memory format (channels_last stays channels_last)."""
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def apply_function(function: type[torch.autograd.Function], *args) -> torch.Tensor:
    """``function.apply(*args)``; under ``TRITON_INTERPRET=1`` outside torch.compile's
    graph (TorchDynamo would trace into the interpreter's Python). On a GPU Dynamo
    handles the Triton kernel launches itself (measured for the HetConv kernels on
    an H100: 1 graph, 0 breaks). ``torch.compiler.disable`` is looked up here, not
    at import, because it imports TorchDynamo (over a second)."""
    if interpreted():
        return torch.compiler.disable(function.apply)(*args)
    return function.apply(*args)
