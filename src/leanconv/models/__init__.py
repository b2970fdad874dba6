"""The model zoo: CIFAR and ImageNet architectures written in the project (no
torchvision), each buildable with every leanconv conv kind.

    model = leanconv.models.create("vgg16_cifar", conv="hetconv", p=4)
    leanconv.models.names()

Which convolutions a kind replaces: every 3x3 (odd kernel > 1) convolution with
groups == 1 except the stem (the first convolution, on the image channels).
1x1 convolutions (shortcuts, bottleneck and MobileNet pointwise convs), the
depthwise convolutions of MobileNets, and linear layers stay standard; so the
MobileNets hold no replaceable convolution at all (see ``models.mobilenet``).

Models (default classes, input size):

==================== ======= ============= ===========================================
name                 classes input         parameters (standard, default classes)
==================== ======= ============= ===========================================
vgg16_cifar          10      3x32x32       14,991,946
resnet20_cifar       10      3x32x32       269,722 (option A shortcuts)
resnet56_cifar       10      3x32x32       853,018
resnet110_cifar      10      3x32x32       1,727,962
wrn16_8_cifar        10      3x32x32       10,961,370
mobilenet_v1_cifar   10      3x32x32       3,217,226
mobilenet_v2_cifar   10      3x32x32       2,236,682
resnet18             1000    3x224x224     11,689,512 (torchvision names)
resnet34             1000    3x224x224     21,797,672
resnet50             1000    3x224x224     25,557,032
mobilenet_v2         1000    3x224x224     3,504,872 (torchvision names)
==================== ======= ============= ===========================================
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from ..conv_spec import resolve_conv
from ._builder import ConvBuilder
from .mobilenet import mobilenet_v1_cifar, mobilenet_v2, mobilenet_v2_cifar
from .resnet_cifar import resnet20_cifar, resnet56_cifar, resnet110_cifar
from .resnet_imagenet import resnet18, resnet34, resnet50
from .vgg import vgg16_cifar
from .wide_resnet import wrn16_8_cifar

__all__ = ["create", "names", "model_info", "ConvBuilder"]

# name -> (constructor(num_classes, builder), default number of classes, input size (C, H, W))
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], int, tuple[int, int, int]]] = {
    "vgg16_cifar": (vgg16_cifar, 10, (3, 32, 32)),
    "resnet20_cifar": (resnet20_cifar, 10, (3, 32, 32)),
    "resnet56_cifar": (resnet56_cifar, 10, (3, 32, 32)),
    "resnet110_cifar": (resnet110_cifar, 10, (3, 32, 32)),
    "wrn16_8_cifar": (wrn16_8_cifar, 10, (3, 32, 32)),
    "mobilenet_v1_cifar": (mobilenet_v1_cifar, 10, (3, 32, 32)),
    "mobilenet_v2_cifar": (mobilenet_v2_cifar, 10, (3, 32, 32)),
    "resnet18": (resnet18, 1000, (3, 224, 224)),
    "resnet34": (resnet34, 1000, (3, 224, 224)),
    "resnet50": (resnet50, 1000, (3, 224, 224)),
    "mobilenet_v2": (mobilenet_v2, 1000, (3, 224, 224)),
}


def register(name: str, constructor: Callable[..., nn.Module], num_classes: int, input_size: tuple[int, int, int]) -> None:
    _REGISTRY[name] = (constructor, num_classes, input_size)


def names() -> list[str]:
    """Every model name ``create`` accepts, sorted."""
    return sorted(_REGISTRY)


def model_info(name: str, conv: str = "standard", p: int | float | None = None, width: float = 1.0,
               round_channels: bool = False, **layer_options) -> dict:
    """What zoo model ``name`` is and, for a conv/width combination, what it builds:
    ``{"num_classes", "input_size": (C, H, W), "channel_widths": [...]}``, the
    channel counts the model's layers get (in construction order, each once).
    Raises create's ValueError when the combination does not fit.

    Example::

        leanconv.models.model_info("resnet20_cifar", width=0.25)["channel_widths"]   # [4, 8, 16]
    """
    _check_name(name)
    _, num_classes, input_size = _REGISTRY[name]
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = create(name, conv, p, width=width, round_channels=round_channels, **layer_options)
    return {"num_classes": num_classes, "input_size": input_size, "channel_widths": list(model.channel_widths)}


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}; known models: {', '.join(names())}")


def create(
    name: str,
    conv: str = "standard",
    p: int | float | None = None,
    num_classes: int | None = None,
    width: float = 1.0,
    round_channels: bool = False,
    **layer_options,
) -> nn.Module:
    """Build zoo model ``name`` with every replaceable convolution of kind ``conv``.

    Args:
        conv: a kind (``standard, hetconv, dsc, bsconv_u, bsconv_s, gwpw``) or
            a spec with options, ``"hetconv:p=4,layout=shifted"``.
        p: the layer option ``p``: HetConv's part P (required for ``hetconv``)
            or BSConv-S's bottleneck fraction (default 0.25); refused for the
            other kinds.
        num_classes: classifier outputs (default: the data set's, 10 or 1000).
        width: multiplies every channel count (rounded half up, at least 1).
            HetConv's P must divide the widths of the convolutions it replaces
            (GWPW's groups their input widths): otherwise a ValueError lists
            the widths and the values that divide them all, unless
            ``round_channels=True`` rounds every width to the nearest multiple
            of P (or the groups).
        layer_options: the kind's other options, e.g. ``layout="shifted"``,
            ``with_bn=True``, ``groups=4`` (gwpw, also ``g``), ``min_mid_channels``.

    The model carries ``default_input_size`` (C, H, W), ``channel_widths``
    (see :func:`model_info`) and ``zoo_config`` (the arguments it was built
    with) so it can be rebuilt.

    Example::

        model = leanconv.models.create("resnet20_cifar", conv="hetconv:p=4")
        logits = model(torch.randn(2, 3, 32, 32))     # (2, 10)
    """
    _check_name(name)
    given = dict(layer_options) if p is None else {**layer_options, "p": p}
    kind, options = resolve_conv(conv, given, argument="conv")
    constructor, default_classes, input_size = _REGISTRY[name]
    num_classes = default_classes if num_classes is None else num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    builder = ConvBuilder(kind, width, options, round_channels=bool(round_channels))
    model = constructor(num_classes=num_classes, builder=builder)
    if builder.misfits:
        raise ValueError(_misfit_message(name, builder))
    model.default_input_size = input_size
    model.channel_widths = list(dict.fromkeys(builder.widths))
    model.zoo_config = {"name": name, "conv": kind, "num_classes": num_classes, "width": width,
                        **({"round_channels": True} if round_channels else {}), **options}
    return model


def _misfit_message(name: str, builder: ConvBuilder) -> str:
    key, divisor = builder.divisor_name, builder.divisor
    widths = sorted(set(builder.widths))
    misfit = sorted({c for pair in builder.misfits for c in pair if c % divisor})
    common = math.gcd(*(c for pair in builder.misfits for c in pair), *(c for c in widths))
    working = [d for d in range(1, common + 1) if common % d == 0]
    return (f"{key}={divisor} does not divide the channel widths {misfit} that {name} builds at width="
            f"{builder.width} (all its widths: {widths}); {key} values that divide every width: "
            f"{', '.join(map(str, working))}; or pass round_channels=True to round every width to a multiple of "
            f"{divisor}")
