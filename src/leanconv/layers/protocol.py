"""What the rest of leanconv asks of a layer kind, in one place (the shape of PyTorch's
``_ConvNd`` and timm's ``reparameterize()``): a kind answers these questions in its
own file, and ``fuse``, ``export`` and ``accounting`` loop over the answers instead of
testing concrete types.

| method | asked by | default |
|---|---|---|
| :meth:`~LeanConvLayer.mac_stages` | ``accounting`` (MACs of a call, cheaper-than checks of ``convert``) | the stages of the layer's children, in order |
| :meth:`~LeanConvLayer.count_macs` | ``accounting.count`` (a row of its own) | None: counted through its convolutions |
| :meth:`~LeanConvLayer.inference_form` | ``fuse`` (step 1: its own BN folded, simpler forms; ``fuse_report_field`` names the report's list for a replaced one) | the layer itself |
| :meth:`~LeanConvLayer.batchnorm_absorber` | ``fuse`` (a following BN folds into this conv) | None |
| :meth:`~LeanConvLayer.fold_output_affine_` | ``fuse`` (``y -> scale * y + shift`` per output channel) | scale ``weight``, fold into ``bias`` |
| :meth:`~LeanConvLayer.fuse_activation` | ``fuse`` (a following ReLU moves in) | False: not taken |
| :meth:`~LeanConvLayer.export_form` | ``export.prepare_for_export`` (standard operators only) | the layer itself, its children prepared |
| ``counting_backend`` | ``accounting.count`` (the backend a shape-only pass runs) | None: no backend choice |
| :meth:`~LeanConvLayer.summary_options` | ``convert``'s report | ``with_bn`` where set |
| :meth:`~LeanConvLayer.regularization_loss` | training (``train``, ``compare``): :func:`regularizers` | None |
| :meth:`~LeanConvLayer.to_conv2d` | benchmarks' correctness gates (the dense reference) | None |
| :meth:`~LeanConvLayer.transfer_from_dense` | ``convert`` (initialise from the dense layer replaced) | not defined |
| :meth:`~LeanConvLayer.dense_equivalent` | ``conversion.calibrate`` (errors from moments), tests | not defined |
| :meth:`~LeanConvLayer.calibration_blocker` | ``conversion.calibrate`` (whether it can fit the layer) | "no fit for this kind" |
| :meth:`~LeanConvLayer.calibration_fit` | ``conversion.calibrate`` (fit to a dense layer's outputs) | not defined |
| ``kind``, ``kind_options``, ``kind_required``, :meth:`~LeanConvLayer.from_spec` | ``make_conv``, ``convert``, the zoo (build by name) | no name: not buildable by name |

Units: MACs (multiply-accumulates); FLOPs = 2 x MACs.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn as nn

__all__ = [
    "LeanConvLayer", "batchnorm_affine", "conv_macs_per_output", "fold_batchnorm", "fold_conv_output_affine_",
    "hetconv_mac_ratio", "hetconv_macs_per_output", "hetconv_paper_macs", "mac_stages", "regularizers", "set_bias",
    "why_not_foldable",
    "write_bias", "write_parameter",
]


def conv_macs_per_output(in_channels: int, kernel_volume: int, groups: int = 1) -> int:
    """MACs of one output element of a (grouped) convolution: (C_in / groups) x kernel volume."""
    return in_channels // groups * kernel_volume


def hetconv_macs_per_output(in_channels: int, kernel_area: int, p: int) -> int:
    """MACs of one HetConv output element: M/P KxK taps plus M - M/P centre taps."""
    kxk_channels = in_channels // p
    return kxk_channels * kernel_area + in_channels - kxk_channels


def hetconv_mac_ratio(p: int, kernel_area: int) -> Fraction:
    """R(P) = 1/P + (1 - 1/P)/K^2: HetConv's MACs over the standard conv's, exactly."""
    return Fraction(1, p) + (1 - Fraction(1, p)) / kernel_area


def hetconv_paper_macs(output_elements: int, in_channels: int, kernel_area: int, p: int) -> int:
    """The HetConv paper's convention: R(P) times the standard convolution's MACs plus one
    bias add per output element."""
    return round(hetconv_mac_ratio(p, kernel_area) * output_elements * (in_channels * kernel_area + 1))


def mac_stages(module: nn.Module) -> list[tuple[nn.Module, int]]:
    """The convolutions one call of ``module`` runs, in order, each with its MACs per
    output element: a leanconv layer's own answer, an ``nn.Conv2d``'s formula, or its
    children's stages."""
    if isinstance(module, LeanConvLayer):
        return module.mac_stages()
    if isinstance(module, nn.Conv2d):
        return [(module, conv_macs_per_output(module.in_channels, math.prod(module.kernel_size), module.groups))]
    return [stage for child in module.children() for stage in mac_stages(child)]


def write_parameter(parameter: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` (any shape with as many elements) into ``parameter``, in its device and dtype."""
    with torch.no_grad():
        parameter.copy_(value.reshape(parameter.shape).to(device=parameter.device, dtype=parameter.dtype))


def write_bias(conv: nn.Module, value: torch.Tensor | None) -> None:
    """Copy ``value`` into ``conv.bias`` where the conv has one (zeros for None)."""
    if conv.bias is not None:
        with torch.no_grad():
            conv.bias.copy_(value.to(conv.bias.dtype) if value is not None else torch.zeros_like(conv.bias))


def set_bias(module: nn.Module, value: torch.Tensor, reference: torch.Tensor) -> None:
    """Set ``module.bias`` to ``value`` (in ``reference``'s device and dtype), creating it if absent."""
    value = value.to(device=reference.device, dtype=reference.dtype)
    if getattr(module, "bias", None) is None:
        module.bias = nn.Parameter(value.clone())
    else:
        with torch.no_grad():
            module.bias.copy_(value)


def regularizers(model: nn.Module) -> list[nn.Module]:
    """The leanconv layers of ``model`` that add a term to the training loss (BSConv-S's
    orthonormality): ``sum(m.regularization_loss() for m in regularizers(model))``."""
    return [m for m in model.modules() if isinstance(m, LeanConvLayer)
            and type(m).regularization_loss is not LeanConvLayer.regularization_loss]


class LeanConvLayer:
    """Mixin of every leanconv layer kind: the protocol of the module docstring.

    Model surgery treats an instance as one unit: ``convert`` never replaces what is
    inside one, ``fuse`` folds BatchNorm into each whole, torch.fx traces it as a leaf.

    A class that sets ``kind`` (its conv-spec name, e.g. ``"hetconv"``) becomes buildable
    by name (``make_conv``, ``leanconv.convert(model, kind)``, the zoo's ``conv=``): it
    accepts ``kind_options`` beyond nn.Conv2d's arguments and needs ``kind_required``
    (option -> meaning; ``"a|b"`` for two spellings); :meth:`from_spec` builds it.
    """

    kind: str | None = None
    kind_options: frozenset = frozenset()
    kind_required: dict = {}
    # The option (its spellings) that must divide the channels named in kind_divides (HetConv's p
    # divides in and out channels; GWC+PWC's groups the input channels): conversion and the zoo
    # round or skip layers it does not divide.
    kind_divisor: tuple = ()
    kind_divides: tuple = ()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__ and cls.kind is not None:
            from .conv_spec import register_kind

            register_kind(cls.kind, cls, cls.kind_options, cls.kind_required)

    @classmethod
    def from_spec(cls, *conv_arguments, **options) -> nn.Module:
        """The layer from nn.Conv2d's arguments and the kind's (checked) options."""
        return cls(*conv_arguments, **options)

    counting_backend: str | None = None
    # The FuseReport list that names a layer whose inference_form is another module.
    fuse_report_field: str = "merged"

    def mac_stages(self) -> list[tuple[nn.Module, int]]:
        """The convolutions one call runs, in order, with their MACs per output element."""
        return [stage for child in self.children() for stage in mac_stages(child)]

    def count_macs(self, output: torch.Tensor, convention: str) -> tuple[int, str] | None:
        """(MACs, detail) of one call that produced ``output`` under ``convention``
        (``"exact"`` or ``"paper"``, see :mod:`leanconv.accounting`), for a layer counted
        as one row; None where its convolutions are counted instead."""
        return None

    def inference_form(self, *, merge_bsconv_s: bool = True) -> nn.Module:
        """An eval-mode module computing the same function for inference, with the
        layer's own BatchNorm folded (may be ``self``, changed in place)."""
        return self

    def batchnorm_absorber(self) -> nn.Module | None:
        """The convolution whose outputs are this layer's outputs channel by channel (so
        a BatchNorm that follows the layer folds into it), or None."""
        return None

    @torch.no_grad()
    def fold_output_affine_(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Apply ``y -> scale * y + shift`` per output channel (float64 ``scale``/``shift``)
        inside the layer's weights and bias (an ``nn.Conv2d``'s rule)."""
        fold_conv_output_affine_(self, scale, shift)

    def fuse_activation(self, activation: str) -> bool:
        """Take the activation that follows the layer into it; False where it cannot."""
        return False

    def export_form(self, *, hetconv_form: str = "split") -> nn.Module:
        """The layer as standard PyTorch operators (for ONNX, TorchScript, torch.export):
        ``self`` for containers, whose children are prepared in turn."""
        return self

    def summary_options(self) -> list[str]:
        """The options a one-line description of the layer shows (conversion reports):
        the kind's own (``p=4``, ``groups=2``) and ``with_bn``."""
        return ["with_bn"] if getattr(self, "with_bn", False) else []

    def regularization_loss(self) -> torch.Tensor | None:
        """The term the kind's paper adds to the training loss (unscaled), or None."""
        return None

    def to_conv2d(self) -> nn.Conv2d | None:
        """An ``nn.Conv2d`` computing exactly the same function, or None where no single
        convolution does (e.g. a 1x1 before a padded depthwise convolution)."""
        return None

    def transfer_from_dense(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[float, float]:
        """Initialise the layer from a dense convolution's ``weight`` (N, M, kh, kw) and
        ``bias`` (its best approximation of that weight; inner BN as identity). Returns
        (squared Frobenius residual of the effective weight, squared norm of ``weight``)."""
        raise NotImplementedError(f"no weight transfer into {type(self).__name__}")

    def dense_equivalent(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight (N, M, kh, kw), bias (N,) or None) of the one convolution that computes
        the same function (with no BatchNorm inside the layer)."""
        raise NotImplementedError(f"{type(self).__name__} declares no dense equivalent")

    def calibration_blocker(self) -> str:
        """"" where :meth:`calibration_fit` can fit the layer now, else why not (a sentence)."""
        return f"no fit for {type(self).__name__}"

    def calibration_fit(self, moments, settings, free_bias: bool) -> tuple[str, torch.Tensor | None]:
        """Fit the layer in place to a dense layer's outputs, from the ``moments`` of
        (input patch, target) pairs (:mod:`leanconv.ops.least_squares` states them) under
        ``settings`` (``ridge``, ``als_iterations``, ``max_features``). ``free_bias``: a
        BatchNorm follows, so a layer without a bias may fit one, returned for that
        BatchNorm to absorb. Returns (how it was fitted, that bias or None)."""
        raise NotImplementedError(f"{type(self).__name__} declares no calibration fit")


@torch.no_grad()
def fold_conv_output_affine_(conv: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """``y -> scale * y + shift`` per output channel of a convolution with ``weight`` (out
    channels first) and an optional ``bias``: weight rows scaled, bias ``scale * b + shift``."""
    weight = conv.weight
    bias = conv.bias.detach().to(torch.float64) if conv.bias is not None else torch.zeros_like(scale)
    weight.copy_((weight.to(torch.float64) * scale.view(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype))
    set_bias(conv, bias * scale + shift, weight)


# ---------------------------------------------------------------- BatchNorm, once
def batchnorm_affine(bn: nn.BatchNorm2d, mean: torch.Tensor | None = None,
                     var: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) in float64, on the BatchNorm's device: in eval mode its output is
    ``scale * x + shift`` per channel, ``scale = gamma / sqrt(var + eps)``, ``shift = beta -
    mean * scale``, with its running statistics, or with ``mean`` and ``var`` where given."""
    mean = (bn.running_mean if mean is None else mean).detach().to(torch.float64)
    var = (bn.running_var if var is None else var).detach().to(torch.float64)
    scale = torch.rsqrt(var.to(mean.device) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(device=mean.device, dtype=torch.float64)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().to(device=mean.device, dtype=torch.float64)
    return scale, shift


def why_not_foldable(bn: nn.Module) -> str | None:
    """None where ``bn`` folds into the convolution before it, else why not."""
    if not isinstance(bn, nn.BatchNorm2d):
        return f"{type(bn).__name__} is not a BatchNorm2d"
    if bn.training:
        return "in training mode (uses batch statistics)"
    if not bn.track_running_stats or bn.running_mean is None:
        return "track_running_stats=False: normalises with batch statistics even in eval mode"
    return None


def fold_batchnorm(conv: nn.Module, bn: nn.BatchNorm2d) -> None:
    """Fold the eval-mode ``bn`` that follows ``conv`` into ``conv`` in place (an
    ``nn.Conv2d`` of any groups, or a leanconv layer that absorbs it: its
    :meth:`~LeanConvLayer.fold_output_affine_`). ValueError if it cannot be folded.

    Example::

        fold_batchnorm(model.conv1, model.bn1); model.bn1 = torch.nn.Identity()
    """
    reason = why_not_foldable(bn)
    if reason:
        raise ValueError(f"cannot fold this BatchNorm: {reason}")
    if conv.out_channels != bn.num_features:
        raise ValueError(f"BatchNorm has {bn.num_features} features, the convolution {conv.out_channels} outputs")
    if isinstance(conv, LeanConvLayer):
        absorber = conv.batchnorm_absorber()
        if absorber is None:
            raise ValueError(f"cannot fold this BatchNorm: {type(conv).__name__} has no convolution whose outputs "
                             "are its own")
        if absorber is not conv:  # a composite kind: its last convolution takes the fold
            fold_batchnorm(absorber, bn)
            return
    scale, shift = batchnorm_affine(bn)
    if isinstance(conv, LeanConvLayer):
        conv.fold_output_affine_(scale, shift)
    else:
        fold_conv_output_affine_(conv, scale, shift)
