"""A new layer kind touches only its own file: a kind defined here, in one class, is
built by name, converted into a model, counted, fused, exported, transferred and
calibrated by the library's own code, with no change anywhere else.

The kind: a KxK convolution to R channels followed by a 1x1 convolution to N (a
rank-R factorisation of the dense weight over (input channel, tap); Ho*Wo*R*(M*K*K + N)
MACs per image).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import leanconv
from leanconv.layers import LeanConvLayer, conv_spec
from leanconv.ops.least_squares import ridge_solve
from leanconv.ops.low_rank import low_rank_factors

from helpers import assert_matches_reference


@pytest.fixture
def bottleneck_kind():
    class BottleneckConv2d(LeanConvLayer, nn.Module):
        kind = "bottleneck_test"
        kind_options = frozenset({"rank"})
        kind_required = {"rank": "the channels between the two convolutions"}

        def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=0, dilation=1, bias=True,
                     padding_mode="zeros", *, rank, device=None, dtype=None):
            super().__init__()
            self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
            self.spatial = nn.Conv2d(in_channels, rank, kernel_size, stride, padding, dilation, bias=False,
                                     padding_mode=padding_mode, device=device, dtype=dtype)
            self.pw = nn.Conv2d(rank, out_channels, 1, bias=bias, device=device, dtype=dtype)

        def forward(self, x):
            return self.pw(self.spatial(x))

        def batchnorm_absorber(self):
            return self.pw

        def dense_equivalent(self):
            pw = self.pw.weight.flatten(1)
            return (pw @ self.spatial.weight.flatten(1)).reshape(self.out_channels, self.in_channels,
                                                                 *self.spatial.kernel_size), self.pw.bias

        @torch.no_grad()
        def transfer_from_dense(self, weight, bias):
            left, right, residual, total = low_rank_factors(weight.flatten(1)[None], self.rank)
            self.spatial.weight.copy_(right[0].reshape(self.spatial.weight.shape))
            self.pw.weight.copy_(left[0].reshape(self.pw.weight.shape))
            if self.pw.bias is not None:
                self.pw.bias.copy_(bias if bias is not None else torch.zeros_like(self.pw.bias))
            return residual, total

        def calibration_blocker(self):
            return ""

        @torch.no_grad()
        def calibration_fit(self, moments, settings, free_bias):
            # the 1x1 half only, by ridge least squares on the spatial outputs
            spatial = self.spatial.weight.double().flatten(1).cpu()
            d = moments.gram.shape[0] - 1
            full = torch.zeros(self.rank + 1, d + 1, dtype=torch.float64)
            full[: self.rank, :d], full[self.rank, d] = spatial, 1.0
            solution = ridge_solve(full @ moments.gram @ full.mT, full @ moments.cross, settings.ridge, True).mT
            self.pw.weight.copy_(solution[:, : self.rank].reshape(self.pw.weight.shape).float())
            if self.pw.bias is not None:
                self.pw.bias.copy_(solution[:, -1].float())
            return "pointwise least squares", None if self.pw.bias is not None or not free_bias else solution[:, -1]

    yield BottleneckConv2d
    conv_spec._KINDS.pop("bottleneck_test", None)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def test_a_kind_defined_in_one_class_works_through_the_whole_library(bottleneck_kind, tmp_path):
    assert "bottleneck_test" in leanconv.CONV_KINDS and "bottleneck_test" in leanconv.layers.CONV_KINDS
    layer = leanconv.make_conv("bottleneck_test:rank=4", 8, 16, 3, padding=1)
    assert isinstance(layer, bottleneck_kind) and layer.rank == 4
    with pytest.raises(ValueError, match="needs the option rank"):
        leanconv.make_conv("bottleneck_test", 8, 16, 3)

    model = _model().eval()
    for bn in (model[1], model[4]):  # statistics that are not the identity
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    converted, report = leanconv.convert(model, "bottleneck_test", rank=8, return_report=True)
    assert isinstance(converted[3], bottleneck_kind) and report.replaced
    assert "bottleneck_test" not in str(type(converted[0]))  # the stem stays (convert's rule)

    # the zoo builds it by name too
    zoo = leanconv.models.create("vgg16_cifar", conv="bottleneck_test", rank=4, width=0.125)
    assert sum(isinstance(m, bottleneck_kind) for m in zoo.modules()) == 12

    # cost accounting through its convolutions: 32x32 maps, R=8: 8*(16*9) + 32*8 MACs per pixel
    costs = leanconv.count(converted, (3, 32, 32))
    layer_rows = [r for r in costs.rows if r.name.startswith("3.")]
    assert sum(r.macs for r in layer_rows) == 32 * 32 * (8 * 16 * 9 + 32 * 8)

    # weight transfer: a dense weight of rank 8 over (input channel, tap) transfers exactly at rank 8
    with torch.no_grad():
        model[3].weight.copy_((torch.randn(32, 8) @ torch.randn(8, 16 * 9)).reshape(32, 16, 3, 3) / 10)
    exact, report = leanconv.convert(model, "bottleneck_test", rank=8, transfer_weights=True, return_report=True)
    assert isinstance(exact[3], bottleneck_kind) and report.replaced[-1].transfer_error < 1e-5
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_matches_reference(exact(x), model(x), rtol=1e-4, atol=1e-4)

    # fuse folds the following BatchNorm into its pointwise conv; export prepares it
    with torch.no_grad():
        fused = leanconv.fuse(converted)
        assert isinstance(fused[4], nn.Identity)
        assert_matches_reference(fused(x), converted(x), rtol=1e-4, atol=1e-4)
        program = leanconv.export.export_program(converted, x)
        assert_matches_reference(program.module()(x), converted(x), rtol=1e-4, atol=1e-4)

    # calibration fits it by its own rule, and lowers the error against the teacher
    calibrated, report = leanconv.convert(model, "bottleneck_test", rank=4, return_report=True, transfer_weights=True,
                                          calibration=torch.randn(32, 3, 32, 32),
                                          calibration_settings={"block_steps": 20})
    fit = report.replaced[-1].calibration
    assert fit.method.startswith("pointwise least squares") and fit.error_fit < fit.error_transfer
