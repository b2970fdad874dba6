"""leanconv.count: the exact convention against FlopCounterMode, the paper
convention against its definition and the HetConv paper's VGG-16 figure, the
per-call rows, and bad input."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import leanconv
from leanconv import BSConvS2d, BSConvU2d, DSConv2d, GWPWConv2d, HetConv2d, models
from leanconv.accounting import count, hetconv_mac_ratio


def counted_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs as torch's FlopCounterMode sees them (it reports FLOPs = 2 x MACs)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    flops = counter.get_total_flops()
    assert flops % 2 == 0
    return flops // 2


def mixed_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1, bias=False),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        DSConv2d(12, 16, 3, stride=2, padding=1, with_bn=True),
        BSConvU2d(16, 16, 5, padding=2),
        BSConvS2d(16, 24, 3, padding=1, with_bn=True),
        GWPWConv2d(24, 24, 3, padding=1, groups=4),
        nn.Conv2d(24, 24, 3, padding=1, groups=3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 7),
    ).eval()


def test_exact_convention_matches_flop_counter_on_standard_and_separable_layers():
    model = mixed_model()
    x = torch.randn(2, 3, 17, 13)
    report = count(model, tuple(x.shape))
    assert report.macs == counted_macs(model, x)
    assert report.flops == 2 * report.macs
    assert report.params == sum(t.numel() for t in model.parameters())


@pytest.mark.parametrize("layout", ["blocked", "shifted"])
@pytest.mark.parametrize(
    "m, n, k, p, stride, padding, dilation",
    [(8, 12, 3, 4, 1, 1, 1), (12, 6, (3, 5), 3, 2, (1, 2), 1), (6, 6, 5, 2, 1, "same", 2), (4, 8, 3, 1, 1, 0, 1)],
)
def test_hetconv_exact_macs_are_the_split_form_and_r_times_dense(layout, m, n, k, p, stride, padding, dilation):
    layer = HetConv2d(m, n, k, stride, padding, dilation, p=p, layout=layout).eval()
    x = torch.randn(2, m, 11, 9)
    report = count(layer, tuple(x.shape))
    # The split backend computes HetConv's MACs plus the zero diagonal of its 1x1
    # part: N*M/P products per output pixel (none at P=1, a plain convolution).
    with leanconv.use_backend("split"):
        out = layer(x)
        zero_products = 0 if p == 1 else out.numel() * (m // p)
        assert report.macs == counted_macs(layer, x) - zero_products
    # The reference backend runs the dense convolution it replaces: R(P) times HetConv's.
    with leanconv.use_backend("reference"):
        dense = counted_macs(layer, x)
    kh, kw = layer.kernel_size
    assert Fraction(report.macs) == hetconv_mac_ratio(p, kh * kw) * dense
    (row,) = report.rows
    assert row.params == sum(t.numel() for t in layer.parameters()) == n * (m // p * kh * kw + m - m // p) + n


def test_paper_convention_reproduces_the_hetconv_papers_vgg16_figures():
    standard = models.create("vgg16_cifar")
    paper = count(standard, (3, 32, 32), convention="paper")
    assert paper.macs == 313_740_288  # the paper's 313.74 M
    exact = count(standard, (3, 32, 32), convention="exact")
    conv_outputs = sum(r.output_shape[1] * r.output_shape[2] * r.output_shape[3]
                       for r in exact.rows if r.type == "Conv2d")
    assert paper.macs - exact.macs == conv_outputs  # one bias add per conv output element
    # HetConv layers: R(P) times the standard layer's MACs plus bias adds.
    for p, millions in [(2, 175.23), (4, 105.98), (16, 54.04)]:
        het = count(models.create("vgg16_cifar", conv="hetconv", p=p), (3, 32, 32), convention="paper")
        assert round(het.macs / 1e6, 2) == millions
        for row_standard, row_het in zip(paper.rows, het.rows):
            if row_het.type == "HetConv2d":
                assert row_het.macs == round(hetconv_mac_ratio(p, 9) * row_standard.macs)
            else:
                assert row_het.macs == row_standard.macs


def test_counts_are_per_input_and_scale_with_batch():
    model = models.create("resnet20_cifar", conv="hetconv", p=4, width=0.5)
    one = count(model, (3, 32, 32))
    four = count(model, (4, 3, 32, 32))
    assert four.macs == 4 * one.macs
    assert one.input_size == (1, 3, 32, 32)
    assert count(model, torch.zeros(2, 3, 32, 32)).macs == 2 * one.macs


def test_shared_module_has_a_row_per_call_and_model_is_untouched():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    het = HetConv2d(4, 4, 3, padding=1, p=2, backend="split")
    model = nn.Sequential(conv, nn.ReLU(), conv, het).train()
    report = count(model, (4, 8, 8))
    assert [r.name for r in report.rows] == ["0", "0 (call 2)", "3"]
    assert report.params == sum(t.numel() for t in model.parameters())  # shared weights once
    assert model.training and het.backend == "split" and het.__dict__.get("last_backend") is None


def test_table_and_json_state_the_unit():
    report = count(mixed_model(), (3, 16, 16))
    assert "FLOPs = 2 x MACs" in report.table()
    data = report.to_dict()
    assert data["macs"] == report.macs and "MACs" in data["unit"]
    assert len(data["rows"]) == len(report.rows)


@pytest.mark.parametrize(
    "model, input_size, convention, match",
    [
        (nn.Conv2d(3, 4, 3), (3, 8, 8), "flops", "convention must be one of"),
        (nn.Conv2d(3, 4, 3), "3,8,8", "exact", "input_size must be"),
        (nn.Conv2d(3, 4, 3), (3, -8, 8), "exact", "input_size must be"),
        ("not a model", (3, 8, 8), "exact", "model must be an nn.Module"),
    ],
)
def test_bad_input_is_named(model, input_size, convention, match):
    with pytest.raises((ValueError, TypeError), match=match):
        count(model, input_size, convention=convention)


def test_count_is_exported_at_top_level():
    assert leanconv.count is count


def test_counting_a_model_prepared_for_export_counts_its_hetconv_layers():
    from leanconv.export import prepare_for_export

    model = torch.nn.Sequential(leanconv.HetConv2d(8, 16, 3, padding=1, p=4), torch.nn.ReLU(),
                                leanconv.HetConv2d(16, 16, 3, padding=1, p=4)).eval()
    prepared = count(prepare_for_export(model), (8, 8, 8))
    # the split form computes M/P*K*K + M products per output (its zero diagonal included)
    assert prepared.macs == 64 * 16 * (2 * 9 + 8) + 64 * 16 * (4 * 9 + 16)
    assert prepared.params == sum(p.numel() for p in model.parameters()) + 16 * 2 + 16 * 4  # + the zero diagonal


def test_layer_macs_of_an_uneven_same_padding():
    from leanconv.accounting import layer_macs

    macs, size = layer_macs(leanconv.make_conv("dsc", 8, 8, 2, padding="same"), (9, 9))
    assert size == (9, 9) and macs == 81 * 8 * (4 + 8)
