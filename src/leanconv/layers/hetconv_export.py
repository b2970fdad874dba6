"""HetConv2d as standard operators only (for exporters that need them): a grouped KxK
convolution plus a 1x1 convolution with a zero diagonal, summed.

HetConv: Singh et al., "HetConv: Heterogeneous Kernel-Based Convolutions for Deep CNNs",
CVPR 2019, https://arxiv.org/abs/1903.04120.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.hetconv_layout import group_channel_order, group_filter_order, materialize_pointwise_matrix

__all__ = ["HetConvExportForm"]


class HetConvExportForm(nn.Module):
    """HetConv2d as standard operators: grouped KxK conv + masked 1x1 conv + add.

    Computes exactly the HetConv2d it was built from (both layouts, any
    stride/padding/dilation/padding_mode); weights are copied, so it is a
    frozen inference snapshot. Cost Ho*Wo*N*(M/P*K*K + M) MACs per image.

    Example::

        form = HetConvExportForm(leanconv.HetConv2d(64, 64, 3, padding=1, p=4))
        torch.onnx.export(form, (torch.randn(1, 64, 8, 8),), "het.onnx")   # Conv, Conv, Add
    """

    def __init__(self, layer: nn.Module) -> None:  # a HetConv2d
        super().__init__()
        m, n, p = layer.in_channels, layer.out_channels, layer.p
        (kh, kw), (dh, dw) = layer.kernel_size, layer.dilation
        padding = layer._padding_pair
        centre = (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
        factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        layout = layer.layout
        self.in_channels, self.out_channels, self.p, self.layout = m, n, p, layout
        self.activation = layer.activation  # a ReLU fused by leanconv.fuse: exported as a Relu after the Add
        self.kxk = nn.Conv2d(
            m, n, layer.kernel_size, layer.stride, padding, layer.dilation, groups=p,
            bias=layer.bias is not None, padding_mode=layer.padding_mode, **factory,
        )
        # 1x1 branch: reads the input under each window's centre tap.
        self.crop = (max(centre[0] - padding[0], 0), max(centre[1] - padding[1], 0))
        pointwise_padding = (max(padding[0] - centre[0], 0), max(padding[1] - centre[1], 0))
        self.pointwise = nn.Conv2d(
            m, n, 1, layer.stride, pointwise_padding, bias=False,
            padding_mode=layer.padding_mode if pointwise_padding != (0, 0) else "zeros", **factory,
        )
        with torch.no_grad():
            if layout == "blocked":
                self.register_buffer("channel_order", None)
                self.register_buffer("filter_inverse", None)
                self.kxk.weight.copy_(layer.weight)
            else:
                channel_order = group_channel_order(m, n, p, layout, layer.weight.device)
                filter_order = group_filter_order(m, n, p, layout, layer.weight.device)
                self.register_buffer("channel_order", channel_order.clone(), persistent=False)
                self.register_buffer("filter_inverse", torch.argsort(filter_order), persistent=False)
                self.kxk.weight.copy_(layer.weight.index_select(0, filter_order))
            if layer.bias is not None:
                bias = layer.bias if layout == "blocked" else layer.bias.index_select(0, filter_order)
                self.kxk.bias.copy_(bias)
            matrix = materialize_pointwise_matrix(layer.pointwise_weight, m, p, layout)
            self.pointwise.weight.copy_(matrix[:, :, None, None])
        self.train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouped_input = x if self.channel_order is None else x.index_select(-3, self.channel_order)
        out = self.kxk(grouped_input)
        if self.filter_inverse is not None:
            out = out.index_select(-3, self.filter_inverse)
        if self.crop != (0, 0):
            taps = self.pointwise(x[..., self.crop[0]:, self.crop[1]:])
            out = out + taps[..., : out.shape[-2], : out.shape[-1]]
        else:
            out = out + self.pointwise(x)
        return torch.relu(out) if self.activation == "relu" else out

    def extra_repr(self) -> str:
        extra = f", activation={self.activation!r}" if self.activation is not None else ""
        return f"p={self.p}, layout={self.layout!r}{extra}"
