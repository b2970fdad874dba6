"""The model zoo: names, every model with every conv kind, standard parameter
counts, width rounding, torchvision-compatible names, create()'s errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from leanconv import models
from leanconv.layers import BSConvU2d, DSConv2d, GWPWConv2d, HetConv2d
from leanconv.layers.blueprint import BSConvS2d

CIFAR = ["vgg16_cifar", "resnet20_cifar", "resnet56_cifar", "resnet110_cifar", "wrn16_8_cifar",
         "mobilenet_v1_cifar", "mobilenet_v2_cifar"]
IMAGENET = ["resnet18", "resnet34", "resnet50", "mobilenet_v2"]

KINDS = [("standard", {}), ("hetconv", dict(p=4)), ("dsc", {}), ("bsconv_u", {}), ("bsconv_s", {}),
         ("gwpw", dict(g=4))]
LAYER_TYPE = {"standard": nn.Conv2d, "hetconv": HetConv2d, "dsc": DSConv2d, "bsconv_u": BSConvU2d,
              "bsconv_s": BSConvS2d, "gwpw": GWPWConv2d}

# Replaceable convolutions (3x3, groups == 1, not the stem) per model.
REPLACED = {"vgg16_cifar": 12, "resnet20_cifar": 18, "resnet56_cifar": 54, "resnet110_cifar": 108,
            "wrn16_8_cifar": 12, "mobilenet_v1_cifar": 0, "mobilenet_v2_cifar": 0,
            "resnet18": 16, "resnet34": 32, "resnet50": 16, "mobilenet_v2": 0}

STANDARD_PARAMS = {
    "vgg16_cifar": 14_991_946, "resnet20_cifar": 269_722, "resnet56_cifar": 853_018,
    "resnet110_cifar": 1_727_962, "wrn16_8_cifar": 10_961_370, "mobilenet_v1_cifar": 3_217_226,
    "mobilenet_v2_cifar": 2_236_682, "resnet18": 11_689_512, "resnet34": 21_797_672,
    "resnet50": 25_557_032, "mobilenet_v2": 3_504_872,
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny at width 0.25: one intra-op thread is as fast, and
    immune to OpenMP spinning when the machine's cores are busy (seen: 200x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_names_lists_every_model():
    assert models.names() == sorted(CIFAR + IMAGENET)
    for name in CIFAR + IMAGENET:
        info = models.model_info(name)
        expected = (10, (3, 32, 32)) if name in CIFAR else (1000, (3, 224, 224))
        assert (info["num_classes"], info["input_size"]) == expected
        assert info["channel_widths"] == models.create(name).channel_widths


@pytest.mark.parametrize("kind,options", KINDS, ids=[k for k, _ in KINDS])
@pytest.mark.parametrize("name", CIFAR + IMAGENET)
def test_every_model_every_kind_builds_and_runs(name, kind, options):
    torch.manual_seed(0)
    model = models.create(name, conv=kind, width=0.25, **options)
    size = 32 if name in CIFAR else 64
    classes = 10 if name in CIFAR else 1000
    assert model.default_input_size == models.model_info(name)["input_size"]
    assert model.zoo_config["conv"] == kind and model.zoo_config["width"] == 0.25
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, classes) and torch.isfinite(out).all()
    if kind != "standard":
        assert sum(type(m) is LAYER_TYPE[kind] for m in model.modules()) == REPLACED[name]


@pytest.mark.parametrize("name", CIFAR + IMAGENET)
def test_standard_parameter_counts(name):
    assert n_params(models.create(name)) == STANDARD_PARAMS[name]


def test_num_classes_and_backward():
    model = models.create("resnet20_cifar", conv="hetconv", p=4, num_classes=100, width=0.5)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", CIFAR + IMAGENET)
def test_round_channels_keeps_p_dividing_channels(name):
    model = models.create(name, conv="hetconv", p=8, width=0.3, round_channels=True)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, HetConv2d)):
            for c in (module.in_channels, module.out_channels):
                assert c == 3 or c % 8 == 0, (name, module)
        if isinstance(module, HetConv2d):
            assert module.p == 8
    assert all(width % 8 == 0 for width in model.channel_widths)
    size = 32 if name in CIFAR else 64
    assert model.eval()(torch.randn(1, 3, size, size)).shape[0] == 1


def test_widths_are_said_out_loud():
    """Without round_channels the widths are width * nominal exactly; a p that
    does not divide them is an error naming the widths and the p that work."""
    assert models.model_info("resnet20_cifar", width=0.25)["channel_widths"] == [4, 8, 16]
    assert models.model_info("resnet20_cifar", "hetconv:p=4", width=0.25)["channel_widths"] == [4, 8, 16]
    with pytest.raises(ValueError, match=r"p=8 does not divide the channel widths \[4\].*\[4, 8, 16\].*1, 2, 4.*"
                                         r"round_channels=True"):
        models.create("resnet20_cifar", conv="hetconv", p=8, width=0.25)
    with pytest.raises(ValueError, match=r"p=3 does not divide.*p values that divide every width: 1$|round_channels"):
        models.model_info("resnet20_cifar", conv="hetconv", p=3)
    rounded = models.model_info("resnet20_cifar", "hetconv", p=8, width=0.25, round_channels=True)
    assert rounded["channel_widths"] == [8, 16]


def test_gwpw_groups_round_channels():
    with pytest.raises(ValueError, match="groups=3 does not divide"):
        models.create("resnet20_cifar", conv="gwpw", groups=3, width=0.5)
    model = models.create("resnet20_cifar", conv="gwpw", groups=3, width=0.5, round_channels=True)
    assert all(m.in_channels % 3 == 0 and m.out_channels % 3 == 0
               for m in model.modules() if isinstance(m, GWPWConv2d))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name,kind", [(name, "hetconv") for name in CIFAR + IMAGENET]
                         + [("resnet20_cifar", "gwpw"), ("vgg16_cifar", "gwpw")])
@pytest.mark.slow
def test_macs_never_grow_as_p_grows(name, kind):
    """For every width the zoo accepts, a larger P (groups) never costs more MACs
    or parameters. Counted on the meta device: shapes only."""
    from leanconv import count

    for width in (0.25, 0.5, 1.0):
        costs = []
        for p in (1, 2, 4, 8, 16):
            options = dict(p=p) if kind == "hetconv" else dict(g=p)
            try:
                with torch.device("meta"):
                    model = models.create(name, conv=kind, width=width, **options)
            except ValueError as error:
                assert "does not divide" in str(error)
                continue
            report = count(model, (3, 32, 32))
            costs.append((p, report.macs, report.params))
        assert len(costs) >= 2, (width, costs)
        for (p_small, macs_small, params_small), (p_large, macs_large, params_large) in zip(costs, costs[1:]):
            assert macs_large <= macs_small and params_large <= params_small, (width, p_small, p_large, costs)


def test_resnet_cifar_shortcut_option_b_and_official_count():
    from leanconv.models.resnet_cifar import ResNetCifar
    model = ResNetCifar(20, shortcut="B")
    # the official bsconv package's cifar_resnet20: 272,480 = 272,474 + a 3-channel input BN
    assert n_params(model) == 272_474
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_mobilenets_have_no_replaceable_convs():
    model = models.create("mobilenet_v2_cifar", conv="hetconv", p=4, width=0.5)
    assert not any(isinstance(m, HetConv2d) for m in model.modules())
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels for m in depthwise)


# torchvision's state_dict keys (and shapes) for the standard models at width 1.
TORCHVISION_KEYS = {
    "resnet18": {
        "conv1.weight": (64, 3, 7, 7), "bn1.running_mean": (64,), "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer1.1.bn2.weight": (64,), "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.running_var": (128,), "layer4.1.conv2.weight": (512, 512, 3, 3),
        "fc.weight": (1000, 512), "fc.bias": (1000,),
    },
    "resnet50": {
        "conv1.weight": (64, 3, 7, 7), "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv2.weight": (64, 64, 3, 3), "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1), "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer3.5.bn3.weight": (1024,), "layer4.2.conv3.weight": (2048, 512, 1, 1), "fc.weight": (1000, 2048),
    },
    "mobilenet_v2": {
        "features.0.0.weight": (32, 3, 3, 3), "features.0.1.running_mean": (32,),
        "features.1.conv.0.0.weight": (32, 1, 3, 3), "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.1.conv.2.weight": (16,), "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.1.0.weight": (96, 1, 3, 3), "features.2.conv.2.weight": (24, 96, 1, 1),
        "features.2.conv.3.running_var": (24,), "features.17.conv.2.weight": (320, 960, 1, 1),
        "features.18.0.weight": (1280, 320, 1, 1), "features.18.1.weight": (1280,),
        "classifier.1.weight": (1000, 1280),
    },
}
TORCHVISION_KEY_COUNTS = {"resnet18": 122, "resnet50": 320, "mobilenet_v2": 314}


@pytest.mark.parametrize("name", sorted(TORCHVISION_KEYS))
def test_torchvision_layer_names(name):
    state = models.create(name).state_dict()
    for key, shape in TORCHVISION_KEYS[name].items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    assert len(state) == TORCHVISION_KEY_COUNTS[name]


@pytest.mark.parametrize("name", sorted(TORCHVISION_KEYS))
def test_torchvision_state_dict_loads(name):
    torchvision = pytest.importorskip("torchvision")
    reference = getattr(torchvision.models, name)(weights=None).state_dict()
    model = models.create(name)
    model.load_state_dict(reference)  # strict: same keys and shapes
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_converted_equals_built():
    from leanconv.conversion import convert
    for name in ("resnet20_cifar", "wrn16_8_cifar", "resnet18"):
        built = models.create(name, conv="hetconv", p=4, width=0.25)
        converted = convert(models.create(name, width=0.25), "hetconv", p=4)
        assert n_params(built) == n_params(converted), name


@pytest.mark.parametrize("kwargs,argument", [
    (dict(name="resnet21_cifar"), "name"),
    (dict(conv="hetconvv"), "conv"),
    (dict(conv="hetconv"), "p"),
    (dict(conv="dsc", p=4), "p"),
    (dict(conv="bsconv_u", p=2), "p"),
    (dict(conv="dsc", layout="shifted"), "layout"),
    (dict(conv="hetconv", p=4, groups=2), "groups"),
    (dict(conv="gwpw"), "groups"),
    (dict(conv="hetconv", p=0), "p"),
    (dict(width=0), "width"),
    (dict(width=-1.0), "width"),
    (dict(width=float("inf")), "width"),
    (dict(width="1"), "width"),
    (dict(num_classes=0), "num_classes"),
    (dict(num_classes=2.5), "num_classes"),
    (dict(num_classes=True), "num_classes"),
])
def test_create_errors_name_the_argument(kwargs, argument):
    kwargs = {"name": "resnet20_cifar", **kwargs}
    with pytest.raises(ValueError, match=argument):
        models.create(**kwargs)
