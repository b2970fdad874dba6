"""leanconv.fuse: BN folding for every kind and every HetConv backend, BSConv-S
merge, approximate -> exact HetConv, pattern search (torch.fx and the
nn.Sequential fallback), what is left alone, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import leanconv
from leanconv.conversion import convert
from leanconv.fuse import fold_batchnorm, fuse
from leanconv.layers import BSConvS2d, BSConvU2d, HetConv2d, ApproximateHetConv2d, make_conv

from helpers import assert_matches_reference


def n_params(module: nn.Module) -> int:
    return sum(t.numel() for t in module.parameters())


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters in every BN."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(c, generator=g) - 0.5)
    return model


def n_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


KINDS = [
    ("standard", {}), ("hetconv", dict(p=4)), ("hetconv", dict(p=4, layout="shifted")), ("hetconv", dict(p=1)),
    ("dsc", dict(with_bn=True)), ("dsc", dict(with_bn=True, depth_multiplier=2)), ("bsconv_u", dict(with_bn=True)),
    ("bsconv_s", dict(with_bn=True)), ("bsconv_s", dict(with_bn=False)), ("gwpw", dict(g=2, with_bn=True)),
    ("dsc", {}),
]
KIND_IDS = [k + "".join(f"-{a}={b}" for a, b in o.items()) for k, o in KINDS]


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("kind,options", KINDS, ids=KIND_IDS)
def test_fuse_every_kind_conv_bn_relu(kind, options, bias):
    torch.manual_seed(0)
    model = nn.Sequential(
        make_conv(kind, 8, 16, 3, stride=2, padding=1, bias=bias, **options), nn.BatchNorm2d(16), nn.ReLU(),
        make_conv(kind, 16, 8, 3, padding=2, dilation=2, bias=bias, **options), nn.BatchNorm2d(8),
    )
    model = randomize_bn(model).eval()
    fused, report = fuse(model, return_report=True)
    assert n_bn(fused) == 0, report
    assert len(report.folded) == 2 and report.pair_search == "torch.fx tracing"
    assert n_bn(model) > 0  # the original is untouched
    x = torch.randn(3, 8, 11, 10)
    with torch.no_grad():
        assert_matches_reference(fused(x), model(x))


HETCONV_BACKENDS = [name for name in leanconv.backend_names() if name != "auto"]


@pytest.mark.parametrize("layout", ["blocked", "shifted"])
@pytest.mark.parametrize("backend", HETCONV_BACKENDS)
def test_hetconv_fold_in_every_backend_stays_exact_hetconv(backend, layout):
    if backend == "triton" and not torch.cuda.is_available():
        pytest.skip("the triton backend runs on CUDA (its interpreter tests are in test_triton_hetconv.py)")
    conv = HetConv2d(8, 12, 3, padding=1, bias=False, p=4, layout=layout, backend=backend)
    model = randomize_bn(nn.Sequential(conv, nn.BatchNorm2d(12))).eval()
    fused = fuse(model)
    layer = fused[0]
    assert isinstance(layer, HetConv2d) and layer.p == 4 and layer.layout == layout and layer.backend == backend
    assert layer.weight.shape == conv.weight.shape and layer.pointwise_weight.shape == conv.pointwise_weight.shape
    assert n_params(layer) == n_params(conv) + 12  # a bias appears, nothing else
    x = torch.randn(2, 8, 7, 9)
    with torch.no_grad():
        expected = model(x)  # runs (and caches prepared weights for) the unfused layer first
        assert_matches_reference(fused(x), expected)
        assert layer.last_backend == backend


def test_seed_hetconv_becomes_exact_hetconv():
    seed = ApproximateHetConv2d(16, 32, 3, stride=2, p=4)
    model = randomize_bn(nn.Sequential(seed, nn.BatchNorm2d(32), nn.ReLU())).eval()
    fused, report = fuse(model, return_report=True)
    assert isinstance(fused[0], HetConv2d) and fused[0].p == 4 and report.exact_hetconv == ["0"]
    # N*M/P fewer weights (and one of the two biases).
    assert n_params(seed) - n_params(fused[0]) == 32 * 16 // 4 + 32
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        assert_matches_reference(fused(x), model(x))


def test_seed_hetconv_round_trip_and_cost():
    exact = HetConv2d(8, 8, 3, padding=1, p=2)
    seed = ApproximateHetConv2d.from_hetconv(exact)
    x = torch.randn(2, 8, 6, 6)
    assert_matches_reference(seed(x), exact(x))
    assert_matches_reference(seed.to_hetconv()(x), exact(x))
    assert n_params(seed) - n_params(exact) == 8 * 8 // 2
    with pytest.raises(ValueError, match="negative padding"):
        ApproximateHetConv2d(8, 8, 3, padding=0, p=2)


def test_bsconv_s_merge_and_no_merge():
    layer = BSConvS2d(16, 24, 3, padding=1, with_bn=True)
    model = randomize_bn(nn.Sequential(layer, nn.BatchNorm2d(24))).eval()
    x = torch.randn(2, 16, 8, 8)
    merged, report = fuse(model, return_report=True)
    assert isinstance(merged[0], BSConvU2d) and report.merged == ["0"]
    assert merged[0].pw.weight.shape == (24, 16, 1, 1) and merged[0].pw.bias is not None
    kept = fuse(model, merge_bsconv_s=False)
    assert isinstance(kept[0], BSConvS2d) and n_bn(kept) == 0
    with torch.no_grad():
        assert_matches_reference(merged(x), model(x))
        assert_matches_reference(kept(x), model(x))


class Residual(nn.Module):
    """A general forward: BN after conv, a residual add, a conv whose output is
    also used by the skip path (its BN must not be folded), a shared conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = leanconv.HetConv2d(8, 8, 3, padding=1, bias=False, p=2)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.shared = nn.Conv2d(8, 8, 1)
        self.bn3 = nn.BatchNorm2d(8)
        self.bn4 = nn.BatchNorm2d(8)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        z = self.conv2(y)
        out = self.bn2(z) + z  # conv2's output has two users
        out = self.bn3(self.shared(out)) + self.bn4(self.shared(x))  # shared is called twice
        return out


def test_fx_pattern_search_on_general_model():
    model = randomize_bn(Residual()).eval()
    fused, report = fuse(model, return_report=True)
    assert report.folded == ["bn1 -> conv1"]
    left = dict(report.left)
    assert set(left) == {"bn2", "bn3", "bn4"}
    assert isinstance(fused.bn1, nn.Identity) and isinstance(fused.bn2, nn.BatchNorm2d)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        assert_matches_reference(fused(x), model(x))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.features(x)
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            y = y * 2
        return self.bn(self.conv(y))


def test_untraceable_model_falls_back_to_sequential_order():
    model = randomize_bn(Untraceable()).eval()
    fused, report = fuse(model, return_report=True)
    assert report.pair_search.startswith("nn.Sequential order")
    assert report.folded == ["features.1 -> features.0"]
    assert "bn" in dict(report.left)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert_matches_reference(fused(x), model(x))


def test_bn_without_running_stats_is_left_with_reason():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False)).eval()
    _, report = fuse(model, return_report=True)
    assert not report.folded and "track_running_stats" in dict(report.left)["1"]


def test_training_mode_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match="model.eval"):
        fuse(model)
    model.eval()
    model[1].train()
    with pytest.raises(ValueError, match="training mode: 1"):
        fuse(model)
    with pytest.raises(ValueError, match="features"):
        fold_batchnorm(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(8).eval())


def test_inplace():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))).eval()
    assert fuse(model, inplace=True) is model and isinstance(model[1], nn.Identity)


@pytest.mark.parametrize("kind,options", [
    ("hetconv", dict(p=4)), ("dsc", dict(with_bn=True)), ("bsconv_u", dict(with_bn=True)),
    ("bsconv_s", dict(with_bn=True)), ("gwpw", dict(g=4, with_bn=True)),
])
def test_fuse_converted_official_resnet20(kind, options):
    bsconv_pytorch = pytest.importorskip("bsconv.pytorch")
    model = bsconv_pytorch.get_model("cifar_resnet20", num_classes=10)
    model = randomize_bn(convert(model, kind, **options)).eval()
    fused, report = fuse(model, return_report=True)
    assert [name for name, _ in report.left] == ["backbone.data_bn"]  # a BN before the stem conv stays
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_matches_reference(fused(x), model(x))


def test_fuse_official_bsconv_modules():
    bsconv_pytorch = pytest.importorskip("bsconv.pytorch")
    model = randomize_bn(bsconv_pytorch.get_model("cifar_resnet20_bsconvs_p1d4", num_classes=10)).eval()
    fused = fuse(model)
    assert n_bn(fused) == 1
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_matches_reference(fused(x), model(x))


def test_fuse_zoo_model():
    models = pytest.importorskip("leanconv.models")
    if not hasattr(models, "create"):
        pytest.skip("leanconv.models.create is not available yet")
    for kind, options in [("hetconv", dict(p=4)), ("bsconv_s", dict(with_bn=True))]:
        model = randomize_bn(convert(models.create("vgg16_cifar", width=0.25), kind, **options)).eval()
        fused = fuse(model)
        assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) == 0
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert_matches_reference(fused(x), model(x))


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("backend", ["split", "reference"])
def test_inplace_fold_invalidates_prepared_weights(backend, channels_last):
    """Inference backends cache weights prepared from the parameters; folding a
    BN in place must not leave a stale cache behind."""
    model = randomize_bn(nn.Sequential(HetConv2d(8, 12, 3, padding=1, p=4, backend=backend), nn.BatchNorm2d(12))).eval()
    x = torch.randn(2, 8, 7, 7)
    if channels_last:  # split packs for oneDNN there
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)  # fills the cache
        fuse(model, inplace=True)
        assert_matches_reference(model(x), expected)


def test_batchnorm_after_a_standalone_depthwise_layer_is_folded():
    from leanconv.layers import DepthwiseConv2d

    class Net(nn.Module):  # a custom forward: pairs are found by torch.fx, with the layer as a leaf
        def __init__(self):
            super().__init__()
            self.dw, self.bn = DepthwiseConv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.conv, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

        def forward(self, x):
            return self.bn2(self.conv(torch.relu(self.bn(self.dw(x)))))

    model = randomize_bn(Net()).eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        expected = model(x)
        fused, report = fuse(model, return_report=True)
        assert n_bn(fused) == 0 and isinstance(fused.dw, DepthwiseConv2d) and fused.dw.bias is not None
        assert report.pair_search == "torch.fx tracing"
        assert_matches_reference(fused(x), expected)


# ------------------------------------------------------------------------- ReLU fusion
class _SharedReLU(nn.Module):
    """torchvision-ResNet style: one ReLU module called twice, and a residual read."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv, nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + y)


def _randomise_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kind", ["standard", "hetconv"])
def test_relu_after_conv_and_bn_is_fused_and_exact(kind, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1) if kind == "standard" else leanconv.HetConv2d(8, 16, 3, padding=1, p=4)
    model = nn.Sequential(conv, nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.Conv2d(16, 4, 1), nn.ReLU()).eval()
    _randomise_bn(model)
    x = torch.randn(2, 8, 6, 7)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
        fused, report = leanconv.fuse(model, return_report=True)
        out = fused(x)
    assert report.relu_fused == ["2 -> 0", "4 -> 3"], report
    assert isinstance(fused[2], nn.Identity) and isinstance(fused[4], nn.Identity)
    assert type(fused[3]).__name__ == "Conv2dReLU"
    if kind == "hetconv":
        assert fused[0].activation == "relu" and "activation='relu'" in repr(fused[0])
    else:
        assert type(fused[0]).__name__ == "Conv2dReLU"
    assert set(fused.state_dict()) == {k for k in model.state_dict() if not k.startswith("1.")}
    assert_matches_reference(out, expected, atol=1e-5, rtol=1e-5)
    traced = torch.jit.trace(fused, x)  # the fused model stays traceable, with the ReLU in the graph
    assert_matches_reference(traced(x), expected, atol=1e-5, rtol=1e-5)


def test_shared_or_residual_relu_is_left_alone():
    model = _SharedReLU(leanconv.HetConv2d(8, 8, 3, padding=1, p=2)).eval()
    _randomise_bn(model)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        expected = model(x)
        fused, report = leanconv.fuse(model, return_report=True)
        out = fused(x)
    assert report.relu_fused == [] and fused.conv1.activation is None
    assert len(report.folded) == 2
    assert_matches_reference(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv2d_relu_matches_conv_then_relu_in_every_mode(channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
    fused = copy.deepcopy(conv)
    fused.__class__ = leanconv.layers.Conv2dReLU
    x = torch.randn(3, 6, 9, 8)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():  # the output keeps the input's format
        out = fused(x)
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert_matches_reference(out, torch.relu(conv(x)), atol=1e-5, rtol=1e-5)
    x.requires_grad_()
    out = fused(x)  # autograd through the in-place ReLU
    out.sum().backward()
    expected = torch.relu(conv(x.detach().requires_grad_()))
    assert_matches_reference(out.detach(), expected.detach(), atol=1e-5, rtol=1e-5)
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fused(x)  # dispatch modes see the convolution
    assert counter.get_total_flops() > 0


def test_relu_false_keeps_the_relu_modules():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    fused, report = leanconv.fuse(model, relu=False, return_report=True)
    assert report.relu_fused == [] and isinstance(fused[1], nn.ReLU) and type(fused[0]) is nn.Conv2d


def test_fused_relu_survives_export_form_and_layout_change(tmp_path):
    from leanconv.export import export_onnx, prepare_for_export

    torch.manual_seed(0)
    model = nn.Sequential(HetConv2d(8, 16, 3, padding=1, p=4), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 4, 1)).eval()
    _randomise_bn(model)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        expected = model(x)
        fused = leanconv.fuse(model)
        assert_matches_reference(prepare_for_export(fused)(x), expected, atol=1e-5, rtol=1e-5)
        shifted = fused[0].to_layout("shifted")
        assert shifted.activation == "relu" and (shifted(x[:, leanconv.ops.channel_permutation(8, 4).argsort()]) >= 0).all()
    result = export_onnx(fused, x, tmp_path / "fused.onnx")  # checks onnxruntime against PyTorch
    assert result.node_counts["Relu"] == 1


def test_fold_batchnorm_into_a_composite_kind_folds_into_its_last_convolution():
    torch.manual_seed(0)
    layer, bn = leanconv.DSConv2d(4, 6, 3, padding=1).eval(), nn.BatchNorm2d(6).eval()
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        expected = bn(layer(x))
        fold_batchnorm(layer, bn)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
