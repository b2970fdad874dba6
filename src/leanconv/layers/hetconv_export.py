"""HetConv2d as standard operators only (for exporters that need them): the split form,
a grouped KxK convolution plus a 1x1 convolution with a zero diagonal, summed.

HetConv: Singh et al., "HetConv: Heterogeneous Kernel-Based Convolutions for Deep CNNs",
CVPR 2019, https://arxiv.org/abs/1903.04120.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.conv_geometry import pad_for_mode
from ..ops.hetconv_split import SplitWeights, prepare_split, run_split
from ..ops.registry import Plan
from .protocol import LeanConvLayer, hetconv_mac_ratio, hetconv_paper_macs

__all__ = ["HetConvExportForm"]


class HetConvExportForm(LeanConvLayer, nn.Module):
    """HetConv2d as standard operators: the split form (:mod:`leanconv.ops.hetconv_split`,
    a grouped KxK conv + a zero-diagonal 1x1 conv + add), with its weights built once.

    Computes exactly the HetConv2d it was built from (both layouts, any
    stride/padding/dilation/padding_mode, a fused ReLU); weights are copied, so it is a
    frozen inference snapshot (its weights are parameters that do not require grad). Cost
    Ho*Wo*N*(M/P*K*K + M) MACs per image: HetConv's plus the 1x1 part's N*M/P zero products,
    which ``leanconv.count`` counts as computed.

    Example::

        form = HetConvExportForm(leanconv.HetConv2d(64, 64, 3, padding=1, p=4))
        torch.onnx.export(form, (torch.randn(1, 64, 8, 8),), "het.onnx")   # Conv, Conv, Add
    """

    def __init__(self, layer: nn.Module) -> None:  # a HetConv2d
        super().__init__()
        self.in_channels, self.out_channels, self.p, self.layout = layer.in_channels, layer.out_channels, layer.p, layer.layout
        self.kernel_size, self.stride, self.dilation = layer.kernel_size, layer.stride, layer.dilation
        self.padding, self._padding_pair = layer.padding, layer._padding_pair
        self.activation = layer.activation  # a ReLU fused by leanconv.fuse: exported as a Relu after the Add
        self.geometry = layer._geometry._replace(activation=None)
        self.mode_padding = layer._mode_padding
        with torch.no_grad():
            weights = prepare_split((layer.weight.detach().clone(), layer.pointwise_weight.detach().clone()),
                                    self.geometry, _plan(layer.weight, False), None)
        self.grouped = nn.Parameter(weights.grouped, requires_grad=False)
        self.pointwise = nn.Parameter(weights.pointwise, requires_grad=False)
        bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.register_parameter("bias", bias)
        self.register_buffer("channel_order", weights.channel_order, persistent=False)
        self.register_buffer("filter_inverse", weights.filter_inverse, persistent=False)
        self.train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if self.mode_padding is not None:
            x, _ = pad_for_mode(x, *self.mode_padding)
        weights = SplitWeights(self.grouped, self.pointwise, self.channel_order, None, self.filter_inverse)
        out = run_split(x, weights, self.bias, self.geometry, _plan(x, x.is_contiguous(memory_format=torch.channels_last)))
        out = torch.relu(out) if self.activation == "relu" else out
        return out.squeeze(0) if unbatched else out

    def mac_stages(self) -> list[tuple[nn.Module, int]]:
        return [(self, self.in_channels // self.p * self.kernel_size[0] * self.kernel_size[1] + self.in_channels)]

    def count_macs(self, output: torch.Tensor, convention: str) -> tuple[int, str]:
        """As computed (``exact``: M/P*K*K + M per output, the zero diagonal included); the
        paper's convention counts it as the HetConv it is."""
        kernel_area = self.kernel_size[0] * self.kernel_size[1]
        if convention == "exact":
            return output.numel() * self.mac_stages()[0][1], f"p={self.p}, split form (zero 1x1 diagonal computed)"
        macs = hetconv_paper_macs(output.numel(), self.in_channels, kernel_area, self.p)
        return macs, f"p={self.p}, R(P)={float(hetconv_mac_ratio(self.p, kernel_area)):.4f}"

    def extra_repr(self) -> str:
        extra = f", activation={self.activation!r}" if self.activation is not None else ""
        return f"p={self.p}, layout={self.layout!r}{extra}"


def _plan(x: torch.Tensor, channels_last: bool) -> Plan:
    """The split form as a frozen graph runs it: no cache, no oneDNN packing, no autograd."""
    return Plan("split", False, channels_last and not x.is_contiguous(), x.dtype, False)
