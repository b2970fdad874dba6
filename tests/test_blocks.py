"""Block reconstruction after the layer fits (leanconv.conversion.calibrate.blocks):
blocks found from the module tree of zoo-shaped and user networks (torch.fx-traceable
or not), the block error lowered against the per-layer fits on a trained residual
network and after ReLU6, SiLU or no activation, parameters shared with another block
left alone, and blocks that cannot be cached named."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import leanconv
from leanconv.conversion.calibrate import BlockFit, CalibrationSettings
from leanconv.conversion.calibrate.blocks import find_blocks
from leanconv.models import create
from leanconv.models.resnet_cifar import ResNetCifar

SUBSET = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10-subset")


def _settled(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """BatchNorm statistics of ``images`` (as a trained network would have), eval mode."""
    model.train()
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = None
    with torch.no_grad():
        model(images)
    return model.eval()


def _members(converted: tuple, block_layers: int = CalibrationSettings.block_layers) -> list[list[str]]:
    """The blocks of a ``convert(..., return_report=True)`` result."""
    student, report = converted
    layers = [student.get_submodule(r.name) for r in report.replaced]
    return [b.members for b in find_blocks(student, layers, block_layers)]


class Residual(nn.Module):
    """A user's residual block whose forward branches on the data (torch.fx cannot trace it)."""

    def __init__(self, channels: int, activation: nn.Module) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act = activation

    def forward(self, x):
        y = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        if bool(x.abs().sum() >= 0):  # data-dependent control flow
            y = y + x
        return self.act(y)


class UserNet(nn.Module):
    def __init__(self, activation: nn.Module = nn.ReLU(), channels: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.first = Residual(channels, activation)
        self.second = Residual(channels, activation)
        self.head = nn.Linear(channels, 10)

    def forward(self, x):
        x = self.second(self.first(self.stem(x)))
        return self.head(x.mean((2, 3)))


# ------------------------------------------------------------------ which blocks
def test_the_blocks_of_cifar_resnets_are_runs_of_basic_blocks():
    converted = leanconv.convert(create("resnet20_cifar"), "hetconv:p=4", return_report=True)
    assert CalibrationSettings.block_layers == 6
    assert _members(converted) == [[f"layer{i}.{j}" for j in (0, 1, 2)] for i in (1, 2, 3)]  # a stage each
    assert _members(converted, block_layers=2) == [[f"layer{i}.{j}"] for i in (1, 2, 3) for j in (0, 1, 2)]
    assert _members(converted, block_layers=1)[:2] == [["layer1.0.conv1"], ["layer1.0.conv2"]]
    deeper = _members(leanconv.convert(create("resnet56_cifar"), "dsc", return_report=True))
    assert len(deeper) == 9 and deeper[1] == ["layer1.3", "layer1.4", "layer1.5"]


def test_a_vgg_block_is_a_run_of_convolutions_with_their_batchnorms_activations_and_pooling():
    converted = leanconv.convert(create("vgg16_cifar", width=0.125), "dsc", return_report=True)
    single = _members(converted, block_layers=1)
    assert single[0] == ["features.3", "features.4", "features.5", "features.6"]  # conv, BN, ReLU, max-pool
    assert single[1] == ["features.7", "features.8", "features.9"]
    assert len(single) == 12
    runs = _members(converted)
    assert len(runs) == 2 and runs[0][:4] == single[0] and runs[1][-1] == "features.43"


def test_the_blocks_of_a_user_network_that_fx_cannot_trace():
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(UserNet())
    converted = leanconv.convert(UserNet(), "bsconv_u", return_report=True)
    assert _members(converted) == [["first"], ["second"]]


def test_a_dense_block_layer_is_a_block():
    class DenseLayer(nn.Module):
        def __init__(self, channels, growth):
            super().__init__()
            self.norm = nn.BatchNorm2d(channels)
            self.conv = nn.Conv2d(channels, growth, 3, padding=1, bias=False)

        def forward(self, x):
            return torch.cat([x, self.conv(F.relu(self.norm(x)))], 1)

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), DenseLayer(8, 8), DenseLayer(16, 8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1))
    converted = leanconv.convert(model, "hetconv:p=2", return_report=True)
    assert _members(converted) == [["1", "2", "3", "4"]]
    assert _members(converted, block_layers=1) == [["1"], ["2", "3", "4"]]


# ------------------------------------------------------------------ what they do
@pytest.mark.parametrize("kind, activation", [
    ("hetconv:p=4", nn.ReLU6()), ("hetconv:p=8,layout=shifted", nn.Identity()), ("dsc", nn.SiLU()),
    ("bsconv_u", nn.ReLU()), ("bsconv_s", nn.Identity()), ("gwpw:g=2", nn.ReLU6()),
], ids=["hetconv-relu6", "hetconv-p8-none", "dsc-silu", "bsconv_u-relu", "bsconv_s-none", "gwpw-relu6"])
def test_every_kind_after_any_activation_lowers_the_block_error(kind, activation):
    torch.manual_seed(0)
    images = torch.randn(96, 3, 8, 8)
    teacher = _settled(UserNet(activation), images)
    settings = {"block_steps": 150}
    student, report = leanconv.convert(teacher, kind, transfer_weights=True, calibration=images,
                                       calibration_settings=settings, return_report=True)
    assert [b.block for b in report.blocks] == ["first", "second"]
    for block in report.blocks:
        assert block.kept and block.error_block < block.error_layers < block.error_transfer, block
        assert block.images == 96 and block.held_out == 12
    assert report.to_dict()["blocks"][0]["error_block"] == report.blocks[0].error_block
    assert "blocks reconstructed after the layer fits (2)" in str(report)


def test_the_step_follows_each_tensors_scale():
    """Each tensor's step is block_lr times its RMS (as Adafactor's): a teacher whose
    convolutions are 20x smaller, their BatchNorm statistics scaled to match (the same
    function; a VGG's weights are 2-5x smaller than a ResNet-20's), gets the same block
    errors, where one absolute step for every tensor would move its weights 20x as far."""
    torch.manual_seed(0)
    images = torch.randn(96, 3, 8, 8)
    teacher = _settled(UserNet(), images)
    for bn in teacher.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.eps = 1e-12  # the scaled variance must not meet eps
    small = copy.deepcopy(teacher)
    with torch.no_grad():
        for block in (small.first, small.second):
            for conv, bn in ((block.conv1, block.bn1), (block.conv2, block.bn2)):
                conv.weight.mul_(0.05)
                bn.running_mean.mul_(0.05)
                bn.running_var.mul_(0.05 ** 2)
        torch.testing.assert_close(small(images), teacher(images), rtol=1e-4, atol=1e-4)
    reports = [leanconv.convert(net, "hetconv:p=4", transfer_weights=True, calibration=images,
                                calibration_settings={"block_steps": 150}, return_report=True)[1]
               for net in (teacher, small)]
    for block, scaled in zip(reports[0].blocks, reports[1].blocks):
        assert block.kept and scaled.kept
        assert scaled.error_layers == pytest.approx(block.error_layers, rel=1e-3)
        assert scaled.error_block == pytest.approx(block.error_block, rel=0.02), (block, scaled)


def test_a_diverging_optimisation_leaves_the_layer_fits():
    """A learning rate so high that the loss overflows to NaN: no check is better than
    the layer fits, so they stay, and the report says so with finite errors."""
    torch.manual_seed(0)
    images = torch.randn(64, 3, 8, 8)
    teacher = _settled(UserNet(), images)
    settings = {"block_steps": 20, "block_lr": 1e30}
    fitted = leanconv.convert(teacher, "hetconv:p=4", transfer_weights=True, calibration=images,
                              calibration_settings={"block_steps": 0})
    student, report = leanconv.convert(teacher, "hetconv:p=4", transfer_weights=True, calibration=images,
                                       calibration_settings=settings, return_report=True)
    for block in report.blocks:
        assert not block.kept and "not kept" in block.method
        assert block.error_block == pytest.approx(block.error_layers)
    torch.testing.assert_close(student(images), fitted(images))


@pytest.mark.parametrize("block_layers", [1, 2, 6])
def test_layer_fits_inside_a_block_start_from_its_cache(block_layers, monkeypatch):
    """A layer inside a block is fitted from the block's cached inputs (the block's modules
    run, not the network before it): the same fits, ReLU refinement, BatchNorm decisions and
    block results as from the images, with fewer passes through the modules before the
    block. Blocks of one convolution (its BatchNorm outside the block) and the user's
    blocks both."""
    from leanconv.conversion.calibrate import driver

    torch.manual_seed(0)
    images = torch.randn(48, 3, 8, 8)
    teacher = _settled(UserNet(), images)
    settings = {"block_steps": 10, "relu_iterations": 1, "block_layers": block_layers, "batch_size": 16}

    def convert(cache_serves: bool):
        if not cache_serves:
            monkeypatch.setattr(driver, "block_feed", lambda *args: None)
        stem_calls = []
        handle = teacher.stem.register_forward_hook(lambda *args: stem_calls.append(1))
        try:
            student, report = leanconv.convert(teacher, "hetconv:p=4", transfer_weights=True, calibration=images,
                                               calibration_settings=settings, return_report=True)
        finally:
            handle.remove()
            monkeypatch.undo()
        return student, report, len(stem_calls)

    cached, reference = convert(True), convert(False)
    for got, want in zip(cached[1].replaced, reference[1].replaced):
        for name in ("error_transfer", "error_fit", "relu_error_refined", "bn_error_kept", "bn_error_reestimated"):
            value, expected = getattr(got.calibration, name), getattr(want.calibration, name)
            assert value == (expected if expected is None else pytest.approx(expected, rel=1e-5)), name
        assert got.calibration.bn_reestimated == want.calibration.bn_reestimated
    for got, want in zip(cached[1].blocks, reference[1].blocks):
        assert got.error_block == pytest.approx(want.error_block, rel=1e-4) and got.kept == want.kept
    torch.testing.assert_close(cached[0].state_dict(), reference[0].state_dict(), rtol=1e-4, atol=1e-5)
    if block_layers == 1:  # a block of one convolution: its BatchNorm is outside, the images serve
        assert cached[2] == reference[2]
    else:  # the teacher's stem, before every block, ran fewer times
        assert cached[2] < reference[2] * 0.8, (cached[2], reference[2])


def test_reported_errors_are_the_blocks_output_errors():
    """The reported error is recomputed here from the block's output on the cached
    inputs (every image held out and fitted when there are fewer than 16)."""
    torch.manual_seed(1)
    images = torch.randn(12, 3, 8, 8)
    teacher = _settled(UserNet(), images)
    student, report = leanconv.convert(teacher, "hetconv:p=4", transfer_weights=True, calibration=images,
                                       calibration_settings={"block_steps": 40}, return_report=True)
    inputs, targets = {}, {}
    hooks = [student.second.register_forward_pre_hook(lambda m, a: inputs.__setitem__("x", a[0])),
             teacher.second.register_forward_hook(lambda m, a, out: targets.__setitem__("y", out))]
    with torch.no_grad():
        student(images), teacher(images)
        for hook in hooks:
            hook.remove()
        error = ((student.second(inputs["x"]) - targets["y"]).norm() / targets["y"].norm()).item()
    assert report.blocks[1].error_block == pytest.approx(error, rel=1e-4)


def test_parameters_that_another_block_uses_are_left_alone():
    class Unit(nn.Module):
        def __init__(self, conv):
            super().__init__()
            self.conv, self.bn = conv, nn.BatchNorm2d(8)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    shared = nn.Conv2d(8, 8, 3, padding=1)
    torch.manual_seed(2)
    images = torch.randn(32, 3, 8, 8)
    teacher = _settled(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Unit(shared), Unit(shared)), images)
    layers_only = leanconv.convert(teacher, "hetconv:p=2", transfer_weights=True, calibration=images,
                                   calibration_settings={"block_steps": 0})
    student, report = leanconv.convert(teacher, "hetconv:p=2", transfer_weights=True, calibration=images,
                                       calibration_settings={"block_steps": 30}, return_report=True)
    assert student[1].conv is student[2].conv and [b.block for b in report.blocks] == ["1"]
    assert report.blocks[0].method.startswith("30 Adam steps on 2 parameter tensors")  # its BatchNorm's
    torch.testing.assert_close(student[1].conv.weight, layers_only[1].conv.weight)


def test_blocks_that_cannot_be_cached_are_named():
    class PairOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return y, y.mean()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.pair = PairOut()

        def forward(self, x):
            return self.pair(self.stem(x))[0]

    _, report = leanconv.convert(Net(), "hetconv:p=2", transfer_weights=True, calibration=torch.randn(4, 3, 8, 8),
                                 calibration_settings={"block_steps": 5}, return_report=True)
    assert report.blocks[0].method == "not reconstructed: its output is not a tensor with the images' batch dimension"
    assert report.replaced[0].calibration.error_fit is not None  # the layer fit still ran


def test_a_block_with_two_inputs_is_reconstructed():
    class Fuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x, skip):
            return torch.relu(self.bn(self.conv(x)) + skip)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.fuse = Fuse()

        def forward(self, x):
            x = self.stem(x)
            return self.fuse(x, x * 0.5)

    torch.manual_seed(3)
    images = torch.randn(32, 3, 8, 8)
    teacher = _settled(Net(), images)
    _, report = leanconv.convert(teacher, "hetconv:p=4", transfer_weights=True, calibration=images,
                                 calibration_settings={"block_steps": 60}, return_report=True)
    assert report.blocks[0].kept and report.blocks[0].error_block < report.blocks[0].error_layers


@pytest.mark.parametrize("changes, message", [
    ({"block_steps": -1}, "block_steps must be an integer >= 0, got -1"),
    ({"block_lr": 0}, "block_lr must be a number > 0, got 0"),
    ({"block_cache_mb": 0}, "block_cache_mb must be an integer >= 1, got 0"),
    ({"block_layers": 1.5}, "block_layers must be an integer >= 1, got 1.5"),
])
def test_bad_block_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        CalibrationSettings(**changes)


def test_block_fit_describes_every_step():
    text = BlockFit("layer1.0", ["layer1.0.conv1"], "10 Adam steps", 64, 8, 0.6, 0.3, 0.2, 0.19, True, 1.5).describe()
    assert text == ("10 Adam steps; output error 0.6 (transfer) -> 0.3 (layer fits) -> 0.2 (optimised) on 8 held-out "
                    "samples (64 images cached); 1.5 s")


# ------------------------------------------------------------------ on a trained residual network
@pytest.mark.slow
def test_on_a_trained_resnet_blocks_beat_the_layer_fits():
    """A ResNet-8 trained for four epochs on the subset (well above chance): block
    reconstruction lowers every block's held-out error below the layer fits', and the
    student's logits on test images it never saw come closer to the teacher's."""
    if not os.path.isdir(SUBSET):
        pytest.skip("../shared/data/cifar10-subset not present")
    from leanconv.data import load_dataset, normalize

    torch.manual_seed(0)
    train, test = load_dataset(SUBSET, "train"), load_dataset(SUBSET, "test")
    x, y = normalize(train.images, train.mean, train.std), torch.as_tensor(train.labels)
    teacher = ResNetCifar(8)
    optimizer = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for epoch in range(4):
        for index in torch.randperm(len(x)).split(64):
            loss = F.cross_entropy(teacher(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    teacher.eval()
    held_out = normalize(test.images[:400], test.mean, test.std)
    with torch.no_grad():
        reference = teacher(held_out)
        accuracy = (reference.argmax(1) == torch.as_tensor(test.labels[:400])).float().mean().item()
    assert accuracy > 0.3  # chance is 0.1

    calibration = x[:256]
    errors = {}
    for steps in (0, 300):
        student, report = leanconv.convert(teacher, "hetconv:p=4", transfer_weights=True, calibration=calibration,
                                           calibration_settings={"block_steps": steps}, return_report=True)
        with torch.no_grad():
            errors[steps] = ((student(held_out) - reference).norm() / reference.norm()).item()
    assert [b.block for b in report.blocks] == ["layer1.0", "layer2.0", "layer3.0"]
    # measured on an AVX-512 host: held-out block errors lowered by 25%, 19% and 8%, logits' error 0.200 -> 0.131
    ratios = [block.error_block / block.error_layers for block in report.blocks]
    assert all(block.kept for block in report.blocks) and max(ratios) < 1 and sum(ratios) / 3 < 0.92, ratios
    assert errors[300] < 0.85 * errors[0], errors


@pytest.mark.parametrize("name, options, size", [
    pytest.param("resnet18", {}, 64, marks=pytest.mark.slow),
    pytest.param("resnet50", {"width": 0.25}, 64, marks=pytest.mark.slow),
    ("wrn16_8_cifar", {"width": 0.25}, 32),
], ids=["resnet18", "resnet50", "wrn16_8"])
def test_zoo_networks_are_calibrated_block_by_block(name, options, size):
    torch.manual_seed(4)
    images = torch.randn(8, 3, size, size)
    teacher = _settled(create(name, **options), images)
    student, report = leanconv.convert(teacher, "hetconv:p=4", transfer_weights=True, calibration=images,
                                       calibration_settings={"block_steps": 5, "pixels_per_image": 8},
                                       return_report=True)
    in_blocks = sorted(layer for block in report.blocks for layer in block.layers)
    assert in_blocks == sorted(r.name for r in report.replaced)  # every replaced layer in exactly one block
    assert all(block.method.startswith("5 Adam steps") for block in report.blocks)
    with torch.no_grad():
        assert torch.isfinite(student(images)).all()
