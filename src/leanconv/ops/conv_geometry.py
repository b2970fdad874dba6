"""Convolution geometry shared by every layer: argument normalisation, output
sizes, padding modes and the "centre tap" view that a 1x1 kernel inside a KxK
window reads.

Nothing here knows about HetConv; these are the rules of ``nn.Conv2d``,
written once so that every layer validates its arguments the same way.
"""

from __future__ import annotations

import operator
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "PADDING_MODES",
    "normalize_pair",
    "normalize_kernel_size",
    "normalize_padding",
    "conv_output_size",
    "pad_for_mode",
    "centre_input",
    "centre_taps",
    "check_conv_input",
    "check_window_fits",
    "HetConvGeometry",
    "DepthwiseGeometry",
    "reads_input_directly",
]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def normalize_pair(value: int | Sequence[int], name: str, *, minimum: int = 1) -> tuple[int, int]:
    """Return ``value`` as a pair of ints (like ``torch.nn.modules.utils._pair``),
    raising a ValueError/TypeError that names ``name`` when it is not valid."""
    def as_int(v) -> int:
        # ints, and 0-dim integer tensors (what a traced ``weight.shape[i]`` is under torch.jit.trace)
        if isinstance(v, bool) or (isinstance(v, torch.Tensor) and (v.dim() or v.is_floating_point())):
            raise TypeError
        return operator.index(v)

    try:
        if isinstance(value, (tuple, list, torch.Size)):
            if len(value) != 2:
                raise TypeError
            pair = (as_int(value[0]), as_int(value[1]))
        else:
            pair = (as_int(value), as_int(value))
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum} in each dimension, got {value!r}")
    return pair


def normalize_kernel_size(kernel_size: int | Sequence[int], *, require_odd: bool = True) -> tuple[int, int]:
    """Kernel size as a pair; odd sizes only when ``require_odd`` (a 1x1 kernel
    sits at the centre tap of the KxK window, which exists only for odd K)."""
    pair = normalize_pair(kernel_size, "kernel_size")
    if require_odd and (pair[0] % 2 == 0 or pair[1] % 2 == 0):
        raise ValueError(
            f"kernel_size must be odd in each dimension (the 1x1 kernels sit at the centre tap "
            f"of the KxK window), got {kernel_size!r}"
        )
    return pair


def normalize_padding(
    padding: str | int | Sequence[int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    *,
    allow_uneven_same: bool = False,
) -> tuple[int, int] | None:
    """Padding as a symmetric pair of ints, resolving ``"same"`` and ``"valid"``
    exactly as ``nn.Conv2d`` does (``"same"`` is refused for stride > 1). An uneven
    ``"same"`` (odd total dilation*(kernel_size-1), which ``nn.Conv2d`` pads more on
    the right) returns None where ``allow_uneven_same``, else is refused."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' is not supported for strided convolutions, got stride={stride}")
            totals = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
            if any(t % 2 for t in totals):
                if allow_uneven_same:
                    return None
                raise ValueError(
                    f"padding='same' needs an even total padding dilation*(kernel_size-1), got {totals}"
                )
            return (totals[0] // 2, totals[1] // 2)
        raise ValueError(f"padding must be 'same', 'valid', an int or a pair of ints, got {padding!r}")
    return normalize_pair(padding, "padding", minimum=0)


def conv_output_size(
    size: int, kernel_size: int, stride: int, padding: int, dilation: int
) -> int:
    """Output length of a convolution along one dimension (PyTorch's formula)."""
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def pad_for_mode(x: torch.Tensor, padding: tuple[int, int], padding_mode: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """Apply a non-zero padding mode explicitly, as ``nn.Conv2d`` does.

    Returns the (possibly padded) input and the padding that remains for the
    convolution itself: ``padding`` for ``"zeros"``, ``(0, 0)`` otherwise.
    """
    if padding_mode == "zeros" or padding == (0, 0):
        return x, padding
    ph, pw = padding
    return F.pad(x, (pw, pw, ph, ph), mode=padding_mode), (0, 0)


def centre_input(
    x: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """``x`` cropped or zero-padded, the same amount at both ends, so that a 1x1 convolution
    with ``stride`` reads, at output (i, j), the input under the centre tap of window (i, j)
    of a KxK convolution with these arguments, and has exactly its Ho x Wo outputs: with c
    the centre offset and p the padding, Ho = (H + 2p - 2c - 1) // s + 1, which is the 1x1
    output of H + 2(p - c) rows. The crops and pads are constants of the geometry, never of
    the input's size, so exported graphs hold for any input size."""
    offset_h = dilation[0] * (kernel_size[0] - 1) // 2 - padding[0]
    offset_w = dilation[1] * (kernel_size[1] - 1) // 2 - padding[1]
    if offset_h > 0 or offset_w > 0:
        crop_h, crop_w = max(offset_h, 0), max(offset_w, 0)
        x = x[..., crop_h: x.shape[-2] - crop_h, crop_w: x.shape[-1] - crop_w]
    pad_h, pad_w = max(0, -offset_h), max(0, -offset_w)
    if pad_h or pad_w:
        x = F.pad(x, (pad_w, pad_w, pad_h, pad_h))
    return x


def centre_taps(
    x: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """The input value under the centre tap of every KxK window.

    For a (B, C, H, W) input and a convolution with these arguments (zero
    padding), returns a (B, C, Ho, Wo) tensor ``t`` with
    ``t[..., i, j] = x_padded[..., i*sh + dh*(kh-1)/2, j*sw + dw*(kw-1)/2]``,
    so a 1x1 convolution of ``t`` is exactly a KxK convolution whose kernels
    are zero except at the centre tap.
    """
    return centre_input(x, kernel_size, stride, padding, dilation)[..., :: stride[0], :: stride[1]]


def check_conv_input(x: torch.Tensor, in_channels: int, layer: str) -> None:
    """Refuse inputs that are not (C, H, W) or (N, C, H, W) with ``in_channels``
    channels, with a message that says what was expected and what came."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise ValueError(
            f"{layer}: expected a 3-D (C, H, W) or 4-D (N, C, H, W) input, got {x.dim()}-D input of shape {tuple(x.shape)}"
        )
    channels = x.shape[-3]
    if channels != in_channels:
        raise ValueError(
            f"{layer}: expected input with {in_channels} channels (dimension -3), got {channels} "
            f"(input shape {tuple(x.shape)})"
        )


def check_window_fits(x: torch.Tensor, geometry, layer: str) -> None:
    """Refuse an input smaller than the dilated kernel after padding, as ``nn.Conv2d``
    does (a kernel would otherwise return an empty output). ``x`` is 4-D, padded for
    its padding mode; ``geometry`` has ``kernel_size``, ``padding`` and ``dilation``."""
    if geometry.padding is None or torch.jit.is_tracing():  # uneven 'same': the input's size; traced sizes are tensors
        return
    for size, k, pad, d in zip(x.shape[-2:], geometry.kernel_size, geometry.padding, geometry.dilation):
        if size + 2 * pad < d * (k - 1) + 1:
            raise ValueError(
                f"{layer}: the padded input ({x.shape[-2] + 2 * geometry.padding[0]} x "
                f"{x.shape[-1] + 2 * geometry.padding[1]}) is smaller than the dilated kernel "
                f"({geometry.dilation[0] * (geometry.kernel_size[0] - 1) + 1} x "
                f"{geometry.dilation[1] * (geometry.kernel_size[1] - 1) + 1}); input shape {tuple(x.shape)}"
            )


class HetConvGeometry(NamedTuple):
    """Everything about a HetConv call that is fixed by the layer, as Python ints
    (never read from a tensor's shape, so that tracing sees constants)."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    p: int
    layout: str
    # An activation applied to the output ("relu"), set by leanconv.fuse: backends that
    # declare it in ``Backend.activations`` apply it in their kernel, the dispatcher
    # applies it after every other backend.
    activation: str | None = None


class DepthwiseGeometry(NamedTuple):
    """A depthwise convolution's fixed arguments (groups = in_channels)."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    activation: str | None = None  # as HetConvGeometry.activation


def reads_input_directly(kernel_size, stride, padding, dilation) -> bool:
    """True when the centre taps of the windows are the input itself (stride 1,
    'same' padding): a 1x1 part then reads ``x`` without a gather."""
    centre = (dilation[0] * (kernel_size[0] - 1) // 2, dilation[1] * (kernel_size[1] - 1) // 2)
    return tuple(stride) == (1, 1) and tuple(padding) == centre
