"""leanconv.convert on networks shaped like the popular model zoos' (written
here, tiny widths): dense concatenation blocks, a conv-MLP head with a large
kernel, grouped and depthwise convolutions, selective-kernel and
squeeze-excitation branches, Conv2d subclasses with dynamic 'same' padding and
with weight standardisation, parametrized convolutions (parametrize, weight
norm), a convolution shared by two paths, convolutions inside ModuleDict,
ModuleList and Sequential, inputs of 3 and 1 channels.

For each network and every kind: convert with and without weight transfer,
count, fuse, export (TorchScript trace for every kind, ONNX for one), a few
training steps; HetConv with p=1 and transferred weights gives the original
outputs exactly."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

import leanconv
from leanconv.export import export_onnx, export_torchscript

KINDS = {"hetconv": dict(p=2), "dsc": {}, "bsconv_u": {}, "bsconv_s": dict(p=0.5), "gwpw": dict(g=2)}

pytestmark = pytest.mark.usefixtures("one_thread")


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, **kwargs) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False,
                                   **kwargs), nn.BatchNorm2d(out_channels), nn.ReLU())


class Classifier(nn.Module):
    """stem -> body -> global pool -> linear: the frame every network below shares."""

    def __init__(self, in_channels: int, body: nn.Module, body_in: int, body_out: int) -> None:
        super().__init__()
        self.stem = conv_bn_relu(in_channels, body_in)
        self.body = body
        self.fc = nn.Linear(body_out, 5)

    def forward(self, x):
        return self.fc(self.body(self.stem(x)).mean((-2, -1)))


class DenseBlock(nn.Module):
    """DenseNet: each layer's BN-ReLU-1x1-BN-ReLU-3x3 output is concatenated to its input."""

    def __init__(self, channels: int, growth: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(channels + i * growth), nn.ReLU(),
                          nn.Conv2d(channels + i * growth, 2 * growth, 1, bias=False),
                          nn.BatchNorm2d(2 * growth), nn.ReLU(), nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False))
            for i in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return x


class ConvMLPHead(nn.Module):
    """VGG's fully connected layers as convolutions: a large kernel over the whole map, then 1x1."""

    def __init__(self, channels: int, hidden: int, size: int) -> None:
        super().__init__()
        self.features = conv_bn_relu(channels, channels)
        self.fc6 = nn.Conv2d(channels, hidden, size)  # 7x7 512 -> 4096 in VGG-16, here 5x5
        self.fc7 = nn.Conv2d(hidden, hidden, 1)

    def forward(self, x):
        return self.fc7(F.relu(self.fc6(self.features(x))))


class GroupedBlock(nn.Module):
    """ResNeXt / MobileNet: a grouped 3x3 and a depthwise 3x3 between 1x1s, a plain 3x3, a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = conv_bn_relu(channels, channels, 1)
        self.grouped = conv_bn_relu(channels, channels, groups=4)
        self.depthwise = conv_bn_relu(channels, channels, groups=channels)
        self.plain = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return F.relu(x + self.bn(self.plain(self.depthwise(self.grouped(self.reduce(x))))))


class SelectiveKernelSE(nn.Module):
    """SKNet's two branches (3x3 and dilated 3x3) mixed by attention, then squeeze-excitation."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(channels, channels), nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(channels), nn.ReLU())])
        self.attention = nn.Sequential(nn.Conv2d(channels, channels // 2, 1), nn.ReLU(),
                                       nn.Conv2d(channels // 2, 2 * channels, 1))
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels // 4, 1), nn.ReLU(),
                                nn.Conv2d(channels // 4, channels, 1), nn.Sigmoid())

    def forward(self, x):
        outputs = torch.stack([branch(x) for branch in self.branches], 1)  # (B, 2, C, H, W)
        weights = self.attention(outputs.sum(1).mean((-2, -1), keepdim=True))
        weights = weights.view(x.shape[0], 2, -1, 1, 1).softmax(1)
        mixed = (outputs * weights).sum(1)
        return mixed * self.se(mixed)


class SameConv2d(nn.Conv2d):
    """TensorFlow 'same' padding computed from the input size in forward (EfficientNet ports)."""

    def forward(self, x):
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads = [total // 2, total - total // 2] + pads
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """Weight standardisation (BiT, NF-Nets): each filter normalised to zero mean, unit variance."""

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                              momentum=0.0, eps=1e-5).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Subclasses(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.same = SameConv2d(channels, channels, 3, stride=2, bias=False)
        self.std = StdConv2d(channels, channels, 3, padding=1)
        self.plain = conv_bn_relu(channels, channels)

    def forward(self, x):
        return self.plain(self.std(F.relu(self.same(x))))


class Symmetric(nn.Module):
    """A parametrization: the kernel made symmetric under a horizontal flip."""

    def forward(self, weight):
        return (weight + weight.flip(-1)) / 2


def parametrized_body(channels: int) -> nn.Module:
    symmetric = nn.Conv2d(channels, channels, 3, padding=1)
    parametrize.register_parametrization(symmetric, "weight", Symmetric())
    normed = nn.utils.parametrizations.weight_norm(nn.Conv2d(channels, channels, 3, padding=1))
    return nn.Sequential(symmetric, nn.ReLU(), normed, nn.ReLU(), conv_bn_relu(channels, channels))


class SharedPaths(nn.Module):
    """One convolution applied on two paths (weight sharing, as in recurrent or Siamese heads)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.shared = nn.Conv2d(channels, channels, 3, padding=1)
        self.left = nn.Sequential(self.shared, nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), self.shared)

    def forward(self, x):
        return self.left(x) + self.right(x)


class Containers(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.stages = nn.ModuleDict({"a": conv_bn_relu(channels, channels), "b": nn.ModuleList(
            [conv_bn_relu(channels, 2 * channels), nn.Sequential(conv_bn_relu(2 * channels, 2 * channels))])})

    def forward(self, x):
        x = self.stages["a"](x)
        for layer in self.stages["b"]:
            x = layer(x)
        return x


NETWORKS = {
    # name: (build(), input channels, image size)
    "dense_block": (lambda: Classifier(1, DenseBlock(8, 4, 3), 8, 20), 1, 8),
    "conv_mlp_head": (lambda: Classifier(3, ConvMLPHead(8, 16, 5), 8, 16), 3, 5),
    "grouped_depthwise": (lambda: Classifier(3, GroupedBlock(8), 8, 8), 3, 8),
    "selective_kernel_se": (lambda: Classifier(3, SelectiveKernelSE(8), 8, 8), 3, 8),
    "conv2d_subclasses": (lambda: Classifier(1, Subclasses(8), 8, 8), 1, 9),
    "parametrized": (lambda: Classifier(3, parametrized_body(8), 8, 8), 3, 8),
    "shared_conv": (lambda: Classifier(3, SharedPaths(8), 8, 8), 3, 8),
    "containers": (lambda: Classifier(1, Containers(4), 4, 8), 1, 8),
}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    make, channels, size = NETWORKS[name]
    torch.manual_seed(0)
    model = make()
    with torch.no_grad():  # BN statistics away from (0, 1), so folding has work to do
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    return model, torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))


def plain_convs(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) is nn.Conv2d]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", list(NETWORKS))
def test_convert_count_fuse_export_train(name, kind, tmp_path):
    model, x = build(name)
    model.eval()
    with torch.no_grad():
        reference = model(x)
    _, report = leanconv.convert(model, kind, input_size=tuple(x.shape[1:]), return_report=True, **KINDS[kind])
    # Nothing replaced only when every candidate would cost more (GWC+PWC on a dense block's
    # narrow 3x3s): then the rest runs with allow_costlier=True.
    costlier = not report.replaced
    assert report.replaced or any("not cheaper" in s.reason for s in report.skipped), str(report)
    for transfer in (False, True):
        converted, report = leanconv.convert(model, kind, transfer_weights=transfer, input_size=tuple(x.shape[1:]),
                                             return_report=True, allow_costlier=costlier, **KINDS[kind])
        assert report.replaced, str(report)
        names = {r.name for r in report.replaced} | {s.name for s in report.skipped}
        assert set(plain_convs(model)) <= names | {a for r in report.replaced for a in r.aliases}
        for record in report.skipped:
            assert record.reason
        with torch.no_grad():
            out = converted.eval()(x)
        assert out.shape == reference.shape and torch.isfinite(out).all()
        # count: the report's totals are leanconv.count's and the replacement saved MACs
        counted = leanconv.count(converted, tuple(x.shape[1:]))
        assert (counted.macs, counted.params) == (report.model_macs_after, report.params_after)
        assert costlier or (counted.macs < report.model_macs_before and counted.params < report.params_before)
    # fuse: same outputs
    fused = leanconv.fuse(converted.eval())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), out, rtol=1e-4, atol=1e-5)
    # export: a trace of the prepared model computes the same
    traced = export_torchscript(converted, x, tmp_path / "model.ts")
    with torch.no_grad():
        torch.testing.assert_close(traced(x), out, rtol=1e-4, atol=1e-5)
    # a few training steps move every replaced layer's weights and keep the loss finite
    converted.train()
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.05, momentum=0.9)
    before = {k: v.clone() for k, v in converted.state_dict().items()}
    for _ in range(3):
        loss = F.cross_entropy(converted(x), torch.tensor([0, 3]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    for record in report.replaced:
        prefix = record.name + "."
        assert any(not torch.equal(before[k], v) for k, v in converted.state_dict().items()
                   if k.startswith(prefix) and v.is_floating_point()), record.name


@pytest.mark.parametrize("name", list(NETWORKS))
def test_hetconv_p1_with_transfer_reproduces_the_original(name):
    model, x = build(name)
    model.eval()
    converted, report = leanconv.convert(model, "hetconv", p=1, transfer_weights=True, allow_costlier=True,
                                         return_report=True)
    assert report.replaced and all(r.transfer_error == 0 for r in report.replaced)
    for record in report.replaced:  # the weights are the original ones, bit for bit
        new, old = converted.get_submodule(record.name), model.get_submodule(record.name)
        assert torch.equal(new.dense_weight(), old.weight) and (old.bias is None or torch.equal(new.bias, old.bias))
    with torch.no_grad():  # P=1 runs one convolution with the layer's own weight: the same outputs, bit for bit
        assert torch.equal(converted.eval()(x), model(x))


def test_unusual_convolutions_are_skipped_with_their_reason_or_replaced_on_request():
    model, x = build("conv2d_subclasses")
    _, report = leanconv.convert(model, "dsc", return_report=True)
    reasons = {s.name: s.reason for s in report.skipped}
    assert "SameConv2d" in reasons["body.same"] and "StdConv2d" in reasons["body.std"]
    model, x = build("parametrized")
    _, report = leanconv.convert(model, "dsc", return_report=True)
    reasons = {s.name: s.reason for s in report.skipped}
    assert "parametrized (weight" in reasons["body.0"] and "parametrized (weight" in reasons["body.2"]
    # On request they are replaced, the report says what is dropped, and the transfer
    # starts from the effective (parametrized) weight: with p=1 the outputs stay equal.
    converted, report = leanconv.convert(model, "hetconv", p=1, convert_subclasses=True, transfer_weights=True,
                                         allow_costlier=True, return_report=True)
    notes = {r.name: r.note for r in report.replaced}
    assert "not kept" in notes["body.0"] and not parametrize.is_parametrized(converted.body[0])
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-6)


def test_legacy_weight_norm_hooks_are_not_silently_dropped():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    with pytest.warns(FutureWarning):
        conv = nn.utils.weight_norm(conv)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), conv)
    with pytest.raises(ValueError, match="cannot be deep-copied.*inplace=True"):
        leanconv.convert(model, "bsconv_u")  # torch cannot deepcopy a legacy weight_norm module
    _, report = leanconv.convert(model, "bsconv_u", inplace=True, return_report=True)
    assert "forward hooks" in {s.name: s.reason for s in report.skipped}["1"] and model[1] is conv


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
                    reason="onnx and onnxruntime are not installed")
@pytest.mark.parametrize("name", ["dense_block", "selective_kernel_se", "shared_conv"])
def test_onnx_export_checked_by_onnxruntime(name, tmp_path):
    model, x = build(name)
    converted = leanconv.convert(model.eval(), "hetconv", p=2)
    result = export_onnx(copy.deepcopy(converted), x, tmp_path / f"{name}.onnx", check=True)
    assert result.max_abs_diff <= result.tolerance and "Conv" in result.node_counts
