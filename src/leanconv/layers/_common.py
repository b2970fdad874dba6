"""Argument checks shared by the separable layers."""

from __future__ import annotations

from ..ops.conv_geometry import PADDING_MODES, normalize_kernel_size, normalize_pair, normalize_padding


def check_conv_arguments(in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode, layer: str) -> None:
    """Validate nn.Conv2d-style arguments up front, naming the layer and argument."""
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{layer}: {name} must be a positive int, got {value!r}")
    kernel = normalize_kernel_size(kernel_size, require_odd=False)
    normalize_padding(padding, kernel, normalize_pair(stride, "stride"), normalize_pair(dilation, "dilation"))
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"{layer}: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")


def describe_spatial(layer, spatial, has_bias: bool, extra: str) -> str:
    """extra_repr in nn.Conv2d's style: channels, kernel, stride, then non-defaults."""
    s = f"{layer.in_channels}, {layer.out_channels}, kernel_size={spatial.kernel_size}, stride={spatial.stride}"
    if spatial.padding != (0, 0):
        s += f", padding={spatial.padding!r}" if isinstance(spatial.padding, str) else f", padding={spatial.padding}"
    if spatial.dilation != (1, 1):
        s += f", dilation={spatial.dilation}"
    if not has_bias:
        s += ", bias=False"
    if spatial.padding_mode != "zeros":
        s += f", padding_mode={spatial.padding_mode!r}"
    return s + extra
