"""Inference fusion: fold BatchNorm into convolutions, fuse the ReLU that follows a
convolution into it, merge BSConv-S's two pointwise convolutions, and turn the
approximate HetConv form into the exact one.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120.
BSConv: Haase & Amthor, CVPR 2020, https://arxiv.org/abs/2003.13549.

A BatchNorm2d in eval mode is the per-channel affine map
``y = s * x + t`` with ``s = gamma / sqrt(running_var + eps)`` and
``t = beta - running_mean * s``. After a convolution whose output channel n is
linear in its weights plus a bias, it folds exactly into that convolution:
filter n's weights times ``s[n]``, bias ``s[n] * b[n] + t[n]``. For HetConv2d
both ``weight`` and ``pointwise_weight`` of filter n are scaled, so the layer
stays an exact HetConv with the same P and layout.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch.nn as nn

from .graph import followers
from .layers import Conv2dReLU, LeanConvLayer
from .layers.protocol import fold_batchnorm, why_not_foldable

__all__ = ["FuseReport", "Conv2dReLU", "fuse", "fold_batchnorm"]


@dataclass
class FuseReport:
    """What :func:`fuse` did: the BN layers folded (``"bn -> conv"``), the
    BSConv-S layers merged, the approximate HetConv layers made exact, the BN
    layers left and why, and how conv -> BN pairs were found."""

    folded: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)
    relu_fused: list[str] = field(default_factory=list)
    exact_hetconv: list[str] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)
    pair_search: str = ""

    def __str__(self) -> str:
        lines = [f"leanconv.fuse: conv -> BN pairs found by {self.pair_search}"]
        lines.append(f"  folded {len(self.folded)} BatchNorm layer(s)" + (": " + ", ".join(self.folded) if self.folded else ""))
        if self.relu_fused:
            lines.append(f"  fused {len(self.relu_fused)} ReLU(s): {', '.join(self.relu_fused)}")
        if self.merged:
            lines.append(f"  merged BSConv-S pw1+pw2: {', '.join(self.merged)}")
        if self.exact_hetconv:
            lines.append(f"  approximate -> exact HetConv: {', '.join(self.exact_hetconv)}")
        for name, reason in self.left:
            lines.append(f"  left {name}: {reason}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ absorbers
def _is_official_bsconv(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bsconv.") and type(module).__name__ in ("BSConvU", "BSConvS")


def _absorber(module: nn.Module) -> nn.Module | None:
    """The convolution inside ``module`` whose outputs are ``module``'s outputs
    channel by channel (so a following BN folds into it), or None."""
    if type(module) is nn.Conv2d:
        return module
    if isinstance(module, LeanConvLayer):
        return module.batchnorm_absorber()
    if _is_official_bsconv(module):
        return module.dw
    return None


# ------------------------------------------------------------------------- layer-internal
def _occurrences(model: nn.Module) -> dict[int, int]:
    """How many places of ``model``'s module tree hold each module (by id): a module held
    twice may be called on another path, so nothing is moved into it."""
    counts: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        counts[id(module)] = counts.get(id(module), 0) + 1
    return counts


def _replace_everywhere(model: nn.Module, old: nn.Module, new: nn.Module) -> list[str]:
    names = []
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent._modules.items()):
            if child is old:
                parent._modules[child_name] = new
                names.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names


def _fuse_relus(model: nn.Module, report: FuseReport) -> None:
    """Each ``nn.ReLU`` whose input is only a HetConv2d's or an nn.Conv2d's output
    (through the Identity left by a folded BatchNorm) moves into that convolution."""
    pairs, _ = followers(model, follower=nn.ReLU, skip=(nn.Identity,))
    occurrences = _occurrences(model)
    for pair in pairs:
        conv_name, relu_name = pair.layer, pair.follower
        conv, relu = model.get_submodule(conv_name), model.get_submodule(relu_name)
        if occurrences[id(conv)] > 1 or occurrences[id(relu)] > 1:
            continue  # a shared module may be used elsewhere without this ReLU
        if type(conv) is nn.Conv2d:
            conv.__class__ = Conv2dReLU  # same parameters, state_dict and hooks
        elif not (isinstance(conv, LeanConvLayer) and conv.fuse_activation("relu")):
            continue
        _replace_everywhere(model, relu, nn.Identity())
        report.relu_fused.append(f"{relu_name} -> {conv_name}")


def fuse(model: nn.Module, *, inplace: bool = False, merge_bsconv_s: bool = True, relu: bool = True,
         return_report: bool = False):
    """An inference copy of ``model`` with BatchNorm folded and layers simplified.

    ``model`` must be in eval mode (``fuse(model.eval())``): folding uses the
    BN running statistics, which is what eval mode computes; a model (or any
    BatchNorm in it) in training mode raises a ValueError.

    What is done, in this order (steps 1 and 2 are each leanconv layer's
    :meth:`~leanconv.layers.LeanConvLayer.inference_form`):

    1. every :class:`ApproximateHetConv2d` (approximate HetConv) becomes the exact
       :class:`HetConv2d` computing the same function (N*M/P fewer weights);
    2. the BN inside leanconv layers is folded: DSC/GWC+PWC into the KxK conv,
       BSConv-U into ``pw``; BSConv-S's ``pw1``, ``bn1``, ``pw2``, ``bn2``
       become one pointwise conv (a ``BSConvU2d`` with a biased ``pw``) when
       ``merge_bsconv_s`` (M*N weights instead of M'*(M+N): fewer passes over
       memory, but more MACs when M' < M*N/(M+N), e.g. the default p=0.25),
       else bn1/bn2 fold into pw1/pw2;
    3. every BatchNorm2d that directly follows a convolution is folded into it
       and replaced by ``nn.Identity``. Convolutions that absorb a BN: exact
       ``nn.Conv2d`` (any groups), ``HetConv2d`` (weight and pointwise_weight of
       each filter scaled, so it stays exact HetConv in every backend), and the
       last conv of DSC/GWC+PWC (``pw``) and BSConv (``dw``), also the official
       bsconv package's modules. Pairs are found by tracing the model with
       torch.fx (leanconv layers as leaves): the BN's only input is a module
       call whose output nothing else uses, and both modules are called once.
       When the model cannot be traced, only consecutive children of plain
       ``nn.Sequential`` containers are recognised. BN applied through
       ``F.batch_norm``, BN before a convolution, and BN after an activation
       are left as they are (listed in the report);
    4. with ``relu`` (the default), every ``nn.ReLU`` module whose only input is a
       ``HetConv2d``'s or an ``nn.Conv2d``'s output (directly or through a folded
       BatchNorm) is fused into it: the HetConv2d gets ``activation="relu"``
       (applied in registers by the ``direct`` kernel, after the convolution by
       the other backends), the nn.Conv2d becomes a :class:`Conv2dReLU` (the
       convolution, then the ReLU in place); the ReLU
       module becomes ``nn.Identity``. Found as in step 3; a functional
       ``F.relu`` is left in place. The standard and the converted model get the
       same treatment, so timings of both stay comparable.

    Returns the fused model (or ``(model, FuseReport)``), in eval mode, whose
    outputs equal ``model``'s within float32 rounding.

    Example::

        fused = leanconv.fuse(model.eval())
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse() needs an nn.Module, got {type(model).__name__}")
    training = [name or "(model)" for name, m in model.named_modules() if m.training and (m is model or isinstance(m, nn.modules.batchnorm._BatchNorm))]
    if training:
        raise ValueError(
            "fuse() is for inference and folds BatchNorm running statistics: call model.eval() first "
            f"(in training mode: {', '.join(training[:5])})"
        )
    target = model if inplace else copy.deepcopy(model)
    report = FuseReport()

    # 1. approximate -> exact HetConv.  2. leanconv layers' own BN.
    done: set[int] = set()
    for name, module in list(target.named_modules()):
        if id(module) in done:
            continue
        done.add(id(module))
        if not isinstance(module, LeanConvLayer):
            continue
        new = module.inference_form(merge_bsconv_s=merge_bsconv_s)
        if new is not module:
            getattr(report, type(module).fuse_report_field).append(name or "(model)")
            if module is target:
                target = new
            else:
                _replace_everywhere(target, module, new)

    # 3. conv -> BN pairs in the model.
    pairs, report.pair_search = followers(target)
    occurrences = _occurrences(target)
    folded_bns: set[int] = set()
    for pair in pairs:
        conv_name, bn_name = pair.layer, pair.follower
        conv_module, bn = target.get_submodule(conv_name), target.get_submodule(bn_name)
        absorber = _absorber(conv_module)
        if absorber is None or why_not_foldable(bn) or absorber.out_channels != bn.num_features:
            continue
        if occurrences[id(conv_module)] > 1 or occurrences[id(bn)] > 1:
            continue  # a shared module may be used elsewhere without this BN
        fold_batchnorm(absorber, bn)
        _replace_everywhere(target, bn, nn.Identity())
        folded_bns.add(id(bn))
        report.folded.append(f"{bn_name} -> {conv_name}")
    for name, m in target.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in folded_bns:
            reason = why_not_foldable(m) or "not directly after a convolution that can absorb it"
            report.left.append((name, reason))
    # 4. conv -> ReLU pairs.
    if relu:
        _fuse_relus(target, report)
    target.eval()
    return (target, report) if return_report else target
