"""The whole-network CPU inference path: oneDNN's prepacked convolution against its
reference on awkward shapes, PrepackedConv2d as a drop-in nn.Conv2d, and
optimize_for_inference on zoo-shaped and users' models (outputs equal the model's)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import leanconv
from leanconv import models
from leanconv.conversion import convert
from leanconv.layers import PrepackedConv2d
from leanconv.ops import onednn
from helpers import assert_matches_reference

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this torch has no oneDNN")

CL = torch.channels_last


def _randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters away from the identity, so that folding is tested."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            if module.affine:
                module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval()


# ----------------------------------------------------------------- the op and its reference
# (in, out, kernel, stride, padding, dilation, groups, size, batch)
AWKWARD = [
    (3, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1, (13, 9), 1),        # a stem on an odd map
    (8, 12, (3, 3), (2, 2), (1, 1), (1, 1), 1, (15, 15), 3),       # stride 2, odd size
    (8, 8, (3, 3), (1, 1), (2, 2), (2, 2), 1, (11, 10), 2),        # dilation
    (16, 16, (3, 3), (1, 1), (1, 1), (1, 1), 16, (9, 7), 1),       # depthwise
    (8, 16, (3, 3), (2, 2), (1, 1), (1, 1), 8, (10, 10), 2),       # depth multiplier 2, stride 2
    (12, 24, (3, 3), (1, 1), (1, 1), (1, 1), 3, (6, 6), 4),        # grouped
    (20, 7, (1, 1), (1, 1), (0, 0), (1, 1), 1, (5, 5), 1),         # 1x1, odd channels
    (6, 10, (1, 3), (1, 2), (0, 1), (1, 1), 1, (7, 9), 2),         # rectangular kernel and stride
    (4, 8, (5, 5), (1, 1), (2, 2), (1, 1), 1, (8, 8), 64),         # batch 64
]


@pytest.mark.parametrize("shape", AWKWARD, ids=lambda s: f"{s[0]}-{s[1]}-k{s[2][0]}x{s[2][1]}-s{s[3][0]}-g{s[6]}-b{s[8]}")
@pytest.mark.parametrize("activation", [None, "relu", "relu6", "silu"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_prepacked_conv_matches_reference(shape, activation, channels_last):
    cin, cout, kernel, stride, padding, dilation, groups, size, batch = shape
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cin, *size, generator=generator) * 3
    if channels_last:
        x = x.contiguous(memory_format=CL)
    weight = torch.randn(cout, cin // groups, *kernel, generator=generator)
    bias = torch.randn(cout, generator=generator)
    packed = onednn.prepack(weight, padding, stride, dilation, groups, x.shape)
    with torch.inference_mode():
        expected = onednn.reference(x, weight, bias, padding, stride, dilation, groups, activation)
        out = onednn.conv2d(x, packed, bias, padding, stride, dilation, groups, activation)
        assert_matches_reference(out, expected, what="conv")
        residual = torch.randn(expected.shape, generator=generator)
        if channels_last:
            residual = residual.contiguous(memory_format=CL)
        expected = onednn.reference(x, weight, bias, padding, stride, dilation, groups, activation, residual)
        out = onednn.conv2d(x, packed, None if activation == "silu" else bias, padding, stride, dilation, groups,
                            activation, residual)
        if activation == "silu":  # and without a bias
            expected = onednn.reference(x, weight, None, padding, stride, dilation, groups, activation, residual)
        assert_matches_reference(out, expected, what="conv + residual")


def test_a_weight_packed_for_one_shape_serves_others():
    weight = torch.randn(8, 4, 3, 3)
    packed = onednn.prepack(weight, (1, 1), (1, 1), (1, 1), 1, (1, 4, 16, 16))
    for shape in [(1, 4, 16, 16), (5, 4, 7, 9), (2, 4, 3, 3)]:
        x = torch.randn(shape)
        with torch.inference_mode():
            assert_matches_reference(onednn.conv2d(x, packed, None, (1, 1), (1, 1), (1, 1), 1),
                                     F.conv2d(x, weight, None, 1, 1), what=str(shape))


# ---------------------------------------------------------------------------- the layer
def test_prepacked_conv2d_is_a_drop_in_conv2d():
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1, bias=True)
    calls = []
    conv.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    layer = PrepackedConv2d.from_conv(conv)
    assert layer.weight is conv.weight and layer.bias is conv.bias  # shared: a tied weight stays tied
    assert list(layer.state_dict()) == list(conv.state_dict())
    plain = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 6, 9, 11)
    for inputs in (x, x.contiguous(memory_format=CL), x[:1]):
        with torch.inference_mode():
            out = layer(inputs)
        assert_matches_reference(out, conv(inputs).detach())
        # the output keeps the input's memory format, as nn.Conv2d's does
        assert out.is_contiguous(memory_format=CL) == inputs.is_contiguous(memory_format=CL)
        assert out.is_contiguous() == inputs.is_contiguous()
    assert len(calls) >= 3  # the hook came along


def test_fast_path_runs_in_inference_and_standard_operators_elsewhere(monkeypatch):
    layer = PrepackedConv2d(4, 8, 3, padding=1, activation="relu")
    calls = []
    original = onednn.conv2d
    monkeypatch.setattr(onednn, "conv2d", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(2, 4, 8, 8)
    with torch.inference_mode():
        layer(x)
    with torch.no_grad():
        layer(x)
    assert len(calls) == 2
    # autograd: the reference, with gradients equal to nn.Conv2d + ReLU's
    x.requires_grad_(True)
    out = layer(x)
    out.square().sum().backward()
    assert len(calls) == 2
    plain = nn.Conv2d(4, 8, 3, padding=1)
    plain.load_state_dict(layer.state_dict())
    x2 = x.detach().clone().requires_grad_(True)
    torch.relu(plain(x2)).square().sum().backward()
    assert_matches_reference(x.grad, x2.grad, what="input gradient")
    assert_matches_reference(layer.weight.grad, plain.weight.grad, what="weight gradient")
    # a dispatch mode (FlopCounterMode counts standard convolutions) sees standard operators
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        layer(x.detach())
    assert counter.get_total_flops() == 2 * 2 * 8 * 8 * 8 * 4 * 9
    assert len(calls) == 2


def test_weight_changed_in_place_is_packed_again():
    layer = PrepackedConv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 6, 6)
    with torch.inference_mode():
        layer(x)
    with torch.no_grad():
        layer.weight.mul_(-2)
    with torch.inference_mode():
        assert_matches_reference(layer(x), F.conv2d(x, layer.weight, layer.bias, padding=1).detach())
    layer.weight = nn.Parameter(torch.randn(4, 4, 3, 3))  # a new tensor
    with torch.inference_mode():
        assert_matches_reference(layer(x), F.conv2d(x, layer.weight, layer.bias, padding=1).detach())


def test_copies_and_pickles_without_the_packed_weights():
    layer = PrepackedConv2d(4, 4, 3, padding="same", activation="relu6")
    x = torch.randn(3, 4, 5, 5)
    with torch.inference_mode():
        expected = layer(x)
    assert layer._packed  # packed by the call
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert "_packed" not in clone.__dict__
        with torch.inference_mode():
            assert torch.equal(clone(x), expected)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = PrepackedConv2d(4, 4, 3, padding="same", activation="relu6")
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.inference_mode():
        assert torch.equal(fresh(x), expected)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="activation must be None or one of .*'gelu'"):
        PrepackedConv2d(4, 4, 3, activation="gelu")
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        PrepackedConv2d(4, 4, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="uneven 'same' padding"):
        PrepackedConv2d.from_conv(nn.Conv2d(4, 4, 4, padding="same"))
    with pytest.raises(ValueError, match="float64"):
        PrepackedConv2d.from_conv(nn.Conv2d(4, 4, 3).double())


def test_input_smaller_than_the_kernel_and_weights_made_in_inference_mode():
    layer = PrepackedConv2d(4, 4, 5)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
        layer(torch.randn(1, 4, 3, 3))
    with torch.inference_mode():
        made = PrepackedConv2d(4, 6, 3, padding=1)  # its parameters have no version counter
        x = torch.randn(2, 4, 5, 5)
        assert_matches_reference(made(x), F.conv2d(x, made.weight, made.bias, padding=1))


def test_residual_of_another_shape_broadcasts_as_torch_does():
    layer = PrepackedConv2d(4, 6, 3, padding=1)
    x, residual = torch.randn(2, 4, 5, 5), torch.randn(1, 6, 1, 1)
    with torch.inference_mode():
        assert_matches_reference(layer(x, residual), F.conv2d(x, layer.weight, layer.bias, padding=1) + residual)


# ------------------------------------------------------------------ the whole-network path
ZOO = [
    ("resnet20_cifar", "standard", 32),
    ("resnet20_cifar", "hetconv:p=4", 32),
    ("resnet20_cifar", "dsc", 32),
    ("resnet20_cifar", "bsconv_u", 32),
    ("resnet20_cifar", "bsconv_s", 32),
    ("resnet20_cifar", "gwpw:groups=4", 32),
    ("mobilenet_v2_cifar", "standard", 32),
    ("resnet18", "dsc", 64),
    ("resnet50", "hetconv:p=4", 64),
]


@pytest.mark.parametrize("name, spec, size", ZOO, ids=lambda v: str(v))
def test_optimized_zoo_model_computes_the_model(name, spec, size):
    torch.manual_seed(0)
    model = models.create(name)
    if spec != "standard":
        model = convert(model, spec)
    _randomize_batchnorm(model)
    optimized, report = leanconv.optimize_for_inference(model, return_report=True)
    assert report.prepacked and not report.left, str(report)
    if "resnet" in name and spec == "standard":  # a converted block ends in a leanconv layer
        assert report.residuals, str(report)
    x = torch.randn(3, 3, size, size)
    with torch.inference_mode():
        expected = model(x)
        for inputs in (x, x.contiguous(memory_format=CL), x[:1]):
            assert_matches_reference(optimized(inputs), expected[: len(inputs)], rtol=1e-4)
    assert not optimized.training


class _Block(nn.Module):
    """A residual block written the ways users write them: ``+=`` on a convolution's
    output, the shortcut computed after the branch, a functional ReLU, a shared ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.project = nn.Conv2d(channels, channels, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = self.project(x) * 0.5
        out += shortcut
        return self.act(out)


class _UserNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(_Block(16), _Block(16))
        self.shared = nn.Conv2d(16, 16, 3, padding=1)  # called twice
        self.head = nn.Conv2d(16, 10, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.blocks(x)
        x = self.shared(x) + self.shared(x).sigmoid()
        return F.silu(self.head(x)).mean((2, 3))


def test_user_network_residuals_activations_and_shared_layers():
    torch.manual_seed(0)
    model = _randomize_batchnorm(_UserNet())
    optimized, report = leanconv.optimize_for_inference(model, return_report=True)
    assert isinstance(optimized, torch.fx.GraphModule)
    assert len(report.residuals) == 2 and all("relu" in text for text in report.residuals), str(report)
    assert any(text.startswith("silu -> head") for text in report.activations), str(report)
    assert any(text.startswith("relu -> stem") for text in report.activations), str(report)
    assert not any("shared" in text for text in report.residuals + report.activations)  # called twice
    assert optimized.get_submodule("shared").activation is None
    x = torch.randn(2, 3, 12, 10)
    with torch.inference_mode():
        for inputs in (x, x.contiguous(memory_format=CL)):
            assert_matches_reference(optimized(inputs), model(inputs), rtol=1e-4)
    assert model.blocks[0].conv2.__class__ is nn.Conv2d  # the user's model is left alone


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.odd = nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular")

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: torch.fx cannot trace it
            x = -x
        return self.odd(self.relu(self.bn(self.conv(x))))


class _InPlaceShortcut(nn.Module):
    """``x += conv(x)`` where the old ``x`` is read again: eager mode sees the sum there too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        x = x * 1.0
        kept = x
        x += self.conv(x)
        return torch.relu(x) + kept


def test_an_in_place_addition_read_elsewhere_keeps_the_models_forward():
    """torch.fx records ``x += y`` out of place: a model where that could matter is optimized
    module by module, never through a graph that computes something else."""
    torch.manual_seed(0)
    model = _InPlaceShortcut().eval()
    optimized, report = leanconv.optimize_for_inference(model, return_report=True)
    assert not report.residuals and report.graph.startswith("modules only (the torch.fx graph may differ"), str(report)
    assert type(optimized) is _InPlaceShortcut
    x = torch.randn(2, 4, 6, 6)
    with torch.inference_mode():
        assert_matches_reference(optimized(x), model(x))


def test_untraceable_model_is_optimized_module_by_module():
    torch.manual_seed(0)
    model = _randomize_batchnorm(nn.Sequential(_Untraceable()))
    optimized, report = leanconv.optimize_for_inference(model, return_report=True)
    assert report.graph.startswith("modules only (torch.fx could not trace"), report.graph
    assert report.prepacked == ["0.conv"]
    assert report.left == [("0.odd", "padding_mode='circular' (oneDNN pads with zeros only)")]
    assert type(optimized) is nn.Sequential
    for x in (torch.randn(2, 3, 8, 8), -torch.randn(2, 3, 8, 8).abs()):
        with torch.inference_mode():
            assert_matches_reference(optimized(x), model(x), rtol=1e-4)


class _Standardized(nn.Conv2d):
    """A conv with a forward of its own (weight standardization, as in BiT/NFNet zoos)."""

    def forward(self, x):
        weight = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


def test_subclassed_and_parametrized_convs_are_left_with_a_reason():
    from torch.nn.utils import parametrize

    class Scale(nn.Module):
        def forward(self, weight):
            return weight * 2

    model = nn.Sequential(_Standardized(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    parametrize.register_parametrization(model[2], "weight", Scale())
    optimized, report = leanconv.optimize_for_inference(model.eval(), return_report=True)
    assert [name for name, _ in report.left] == ["0", "2"]
    assert "forward is its own" in report.left[0][1]
    x = torch.randn(2, 3, 7, 7)
    with torch.inference_mode():
        assert_matches_reference(optimized(x), model(x))


def test_training_mode_is_refused():
    with pytest.raises(ValueError, match="call model.eval"):
        leanconv.optimize_for_inference(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


def test_the_same_counts_and_export_as_the_fused_model(tmp_path):
    torch.manual_seed(0)
    model = _randomize_batchnorm(convert(models.create("resnet20_cifar"), "dsc"))
    optimized = leanconv.optimize_for_inference(model)
    fused = leanconv.fuse(model)
    assert leanconv.count(optimized, (3, 32, 32)).macs == leanconv.count(fused, (3, 32, 32)).macs
    # tracing and export see standard operators
    x = torch.randn(2, 3, 32, 32)
    traced = torch.jit.trace(optimized, x)
    with torch.inference_mode():
        assert_matches_reference(traced(x), model(x), rtol=1e-4)
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    result = leanconv.export.export_onnx(optimized, x, tmp_path / "optimized.onnx")
    assert result.max_abs_diff is not None and result.max_abs_diff <= result.tolerance


@pytest.mark.slow
def test_torch_compile_takes_the_optimized_model():
    torch.manual_seed(0)
    model = _randomize_batchnorm(_UserNet())
    optimized = leanconv.optimize_for_inference(model)
    compiled = torch.compile(optimized, fullgraph=True)
    x = torch.randn(2, 3, 12, 10).contiguous(memory_format=CL)
    with torch.no_grad():
        assert_matches_reference(compiled(x), model(x), rtol=1e-4)
