"""Data-aware conversion: fit each replaced layer, in network order, to
reproduce the dense layer it replaced on calibration images.

For every replaced layer ``i`` (in the order the network runs them):

1. **Statistics.** The teacher (the unconverted network) runs up to its
   dense convolution and gives the target ``Y`` (the dense layer's output on
   the teacher's own input); the student (the converted network, layers
   ``< i`` already fitted) runs up to layer ``i`` and gives the input ``X`` it
   actually receives, so the fit compensates the errors of earlier layers.
   At a sample of output pixels (``pixels_per_image``; every pixel of small
   maps) the KxK patches ``u`` of ``X`` (the dense layer's geometry: stride,
   dilation, padding mode) and ``y`` of ``Y`` are accumulated into the
   moments ``G = sum u u^T``, ``C = sum u y^T`` (with a constant feature for
   the bias), ``sum y`` and ``sum y^2`` in float64. Memory is bounded by
   ``(M kh kw + 1)^2`` for ``G``, whatever the number of images or pixels.
2. **Fit.** Every kind computes ``W_eff u + b``, where ``W_eff`` (N, M kh kw)
   is the layer's effective dense weight, so its squared output error is the
   quadratic ``tr(W G W^T) - 2 tr(W C) + sum y^2`` of the moments alone:

   * HetConv's output is linear in all its weights: each filter is a ridge
     least-squares problem over the patch entries its pattern keeps (its
     group's KxK taps, the centre tap of every other channel), solved in
     closed form (Cholesky, float64); filters with the same pattern share one
     factorisation.
   * The separable kinds are bilinear and are fitted by alternating least
     squares from the SVD factors of the weight transfer, each half step an
     exact ridge least-squares solve: DSC and GWC+PWC alternate the pointwise
     weights (with the bias) and the KxK weights (a joint solve, skipped
     when it would exceed ``max_features`` unknowns: GWC+PWC with many
     channels per group fits its pointwise weights only); BSConv-U alternates,
     per filter, its pointwise row (with the bias) and its blueprint;
     BSConv-S keeps ``pw1`` (orthonormal rows from the SVD) and alternates
     ``pw2``'s row and the blueprint.
   * Layers with a BatchNorm inside (``with_bn``), with more than
     ``max_features`` patch entries, or that never ran on the calibration
     images are not fitted (the report says why).

   A layer without a bias whose output goes straight into a BatchNorm is
   fitted with one (the intercept of the least squares), folded into that
   BatchNorm's running mean. A fit is kept only where it lowers the sampled
   output error.
3. **ReLU-aware refinement** (``relu_iterations`` passes). Where the
   layer's output goes into a BatchNorm whose output only a ReLU reads (a
   module or a function; seen by watching every torch function during one
   forward pass), errors where both the teacher's and the layer's units are
   off cost nothing after the ReLU. The fit alternates (Zhang et al.,
   "Accelerating Very Deep Convolutional Networks for Classification and
   Detection", TPAMI 2016): project the layer's predictions onto the
   outputs that give the teacher's activations exactly (the teacher's
   output where its unit is on, the dead region where it is off), then
   refit the layer by the same least squares to the projected targets (the
   Gram matrix is reused; each pass recomputes only ``sum u z^T`` over the
   same sampled pixels). The weights with the smallest distance are kept,
   and that BatchNorm keeps the teacher's statistics (the dead region is
   defined by them).
4. **BatchNorm.** When the replaced layer's output goes straight into a
   BatchNorm, its statistics are re-estimated from the fitted layer's output
   only where that lowers the error of the BatchNorm's output against the
   teacher's, and always after a layer that was not fitted. Both errors are
   computed from the same moments and reported (``batchnorm="always"`` or
   ``"never"`` forces the choice after fitted layers, to measure both).

Errors are relative: ``||output - target|| / ||target||`` over the sampled
pixels of every calibration image.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..layers import BSConvS2d, BSConvU2d, DSConv2d, GWPWConv2d, HetConv2d
from ..ops.hetconv_layout import extract_hetconv_weights, materialize_dense_weight

__all__ = ["CalibrationSettings", "LayerFit", "as_batches", "calibrate"]


@dataclass(frozen=True)
class CalibrationSettings:
    """How :func:`calibrate` samples and solves (see the module docstring)."""

    pixels_per_image: int = 64
    ridge: float = 1e-3  # relative to the mean diagonal of each solve's Gram matrix
    als_iterations: int = 10
    max_features: int = 6144  # M*kh*kw (and joint KxK unknowns) beyond this: not fitted
    batch_size: int = 128  # images per forward pass
    seed: int = 0
    # BatchNorm after a fitted layer: re-estimate its statistics where that lowers the error
    # ("auto"), always, or never; after a layer that was not fitted they are always re-estimated.
    batchnorm: str = "auto"
    fit: bool = True  # False: no layer is fitted, only the BatchNorms after them re-estimated
    # Layers followed by BatchNorm + ReLU: passes of the ReLU-aware refinement after the linear fit (0: none)
    relu_iterations: int = 0

    def __post_init__(self) -> None:
        for name, low in (("pixels_per_image", 1), ("als_iterations", 0), ("relu_iterations", 0), ("max_features", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"calibration setting {name} must be an integer >= {low}, got {value!r}")
        if self.batchnorm not in ("auto", "always", "never"):
            raise ValueError(f"calibration setting batchnorm must be 'auto', 'always' or 'never', got "
                             f"{self.batchnorm!r}")
        if not isinstance(self.ridge, (int, float)) or isinstance(self.ridge, bool) or not self.ridge >= 0:
            raise ValueError(f"calibration setting ridge must be a number >= 0, got {self.ridge!r}")


@dataclass
class LayerFit:
    """What calibration did to one replaced layer: relative output errors on the
    calibration sample with the transferred weights and after the fit (None
    when not fitted), how it was fitted or why not, and the BatchNorm decision."""

    method: str
    error_transfer: float | None = None
    error_fit: float | None = None
    batchnorm: str | None = None  # name of the BatchNorm fed by the layer
    bn_error_kept: float | None = None  # its output error with the teacher's statistics
    bn_error_reestimated: float | None = None
    bn_reestimated: bool = False
    samples: int = 0
    # layers followed by BatchNorm + ReLU, with relu_iterations: relative error of the activations
    # (distance from the exact ones, an upper bound of the error after the ReLU) before and after
    relu_error_linear: float | None = None
    relu_error_refined: float | None = None

    def describe(self) -> str:
        parts = [self.method]
        if self.error_transfer is not None:
            after = "" if self.error_fit is None else f" -> {self.error_fit:.3g}"
            parts.append(f"output error {self.error_transfer:.3g}{after}")
        if self.relu_error_linear is not None:
            parts.append(f"activation error {self.relu_error_linear:.3g} -> {self.relu_error_refined:.3g}")
        if self.batchnorm is not None:
            action = "re-estimated" if self.bn_reestimated else "kept"
            errors = ""
            if self.bn_error_kept is not None:
                errors = f" (error kept {self.bn_error_kept:.3g}, re-estimated {self.bn_error_reestimated:.3g})"
            parts.append(f"{self.batchnorm} statistics {action}{errors}")
        return "; ".join(parts)


# ------------------------------------------------------------------ the data
def as_batches(calibration, batch_size: int) -> list[torch.Tensor]:
    """``calibration`` (a (B, C, H, W) tensor, or an iterable of such tensors
    or of (images, labels) pairs) as a list of image batches of at most
    ``batch_size``; the iterable is read once."""
    if isinstance(calibration, torch.Tensor):
        tensors = [calibration]
    elif isinstance(calibration, Iterable) and not isinstance(calibration, (str, bytes)):
        tensors = [item[0] if isinstance(item, (tuple, list)) else item for item in calibration]
    else:
        raise TypeError(f"calibration must be a tensor of images or an iterable of batches, got "
                        f"{type(calibration).__name__}")
    batches = []
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4 or not tensor.is_floating_point():
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"calibration batches must be floating (B, C, H, W) image tensors, got {got}")
        batches.extend(tensor.split(batch_size))
    batches = [b for b in batches if len(b)]
    if not batches:
        raise ValueError("calibration holds no images")
    if len({tuple(b.shape[1:]) for b in batches}) != 1:
        raise ValueError(f"calibration images must all have one (C, H, W) size, got "
                         f"{sorted({tuple(b.shape[1:]) for b in batches})}")
    return batches


class _Stop(Exception):
    """Raised by a hook once a forward pass has given what it was run for."""


def _run_until(model: nn.Module, images: torch.Tensor, module: nn.Module, calls: int, pre: bool) -> list:
    """Run ``model`` until ``module`` has run ``calls`` times; its inputs (``pre``)
    or outputs of those calls."""
    seen: list = []

    def keep(value):
        seen.append(value)
        if len(seen) >= calls:
            raise _Stop

    if pre:
        handle = module.register_forward_pre_hook(lambda m, args: keep(args[0]))
    else:
        handle = module.register_forward_hook(lambda m, args, output: keep(output))
    try:
        model(images)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen


# -------------------------------------------------------------- the moments
def _patch_rows(x: torch.Tensor, conv: nn.Conv2d, positions: torch.Tensor) -> torch.Tensor:
    """(B*k, M*kh*kw) patches of ``x`` under ``conv``'s geometry at output
    positions ``positions`` (B, k), ordered like ``conv.weight.view(N, -1)``."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    out_w = (padded.shape[-1] - dw * (kw - 1) - 1) // sw + 1
    rows = (positions // out_w) * sh  # (B, k)
    cols = (positions % out_w) * sw
    taps_h = torch.arange(kh, device=x.device).repeat_interleave(kw) * dh  # (T,)
    taps_w = torch.arange(kw, device=x.device).repeat(kh) * dw
    r = rows[..., None] + taps_h  # (B, k, T)
    c = cols[..., None] + taps_w
    b = torch.arange(x.shape[0], device=x.device)[:, None, None].expand_as(r)
    patches = padded.permute(0, 2, 3, 1)[b, r, c]  # (B, k, T, M)
    return patches.permute(0, 1, 3, 2).reshape(-1, x.shape[1] * kh * kw)


def _features(patches: torch.Tensor) -> torch.Tensor:
    """(S, D+1) float64: the patches and the constant feature of the bias."""
    return torch.cat([patches, patches.new_ones(len(patches), 1)], 1).double()


@dataclass
class _Moments:
    """Moments of (patch, target) pairs; feature index D is the constant 1."""

    gram: torch.Tensor  # (D+1, D+1)
    cross: torch.Tensor  # (D+1, N)
    target_sum: torch.Tensor  # (N,)
    target_square: torch.Tensor  # (N,)
    count: int = 0

    @classmethod
    def empty(cls, features: int, outputs: int) -> "_Moments":
        f64 = torch.float64
        return cls(torch.zeros(features + 1, features + 1, dtype=f64), torch.zeros(features + 1, outputs, dtype=f64),
                   torch.zeros(outputs, dtype=f64), torch.zeros(outputs, dtype=f64))

    def add(self, patches: torch.Tensor, targets: torch.Tensor) -> None:
        # float64 products: the errors are differences of these sums (a float32
        # Gram matrix leaves relative errors below ~1e-3 unmeasurable)
        features = _features(patches)
        targets = targets.double()
        self.gram += (features.mT @ features).cpu()
        self.cross += (features.mT @ targets).cpu()
        self.target_sum += targets.sum(0).cpu()
        self.target_square += targets.square().sum(0).cpu()
        self.count += len(patches)

    def squared_error(self, weight: torch.Tensor) -> torch.Tensor:
        """Per output: sum over samples of (weight @ [u; 1] - y)^2 for weight (N, D+1)."""
        return ((weight @ self.gram) * weight).sum(1) - 2 * (weight * self.cross.mT).sum(1) + self.target_square

    def relative_error(self, weight: torch.Tensor) -> float:
        total = self.target_square.sum().item()
        return math.sqrt(max(self.squared_error(weight).sum().item(), 0.0) / total) if total > 0 else 0.0


def _samples(teacher, student, teacher_conv, new_layer, batches, calls, settings, layer_index):
    """Yield (patches (S, M*kh*kw), targets (S, N)) per batch and call: the
    student's input patches and the teacher's outputs at the sampled pixels.
    The same pixels on every pass (seeded by layer, batch and call)."""
    conv = teacher_conv
    device = conv.weight.device
    for batch_index, images in enumerate(batches):
        images = images.to(device=device, dtype=conv.weight.dtype)
        targets = _run_until(teacher, images, conv, calls, pre=False)
        inputs = _run_until(student, images, new_layer, calls, pre=True)
        for call, (x, y) in enumerate(zip(inputs, targets)):
            if x.dim() == 3:  # unbatched call
                x, y = x[None], y[None]
            positions_total = y.shape[-2] * y.shape[-1]
            k = min(positions_total, settings.pixels_per_image)
            generator = torch.Generator().manual_seed(settings.seed + 7919 * layer_index + 104729 * batch_index + call)
            positions = torch.stack([torch.randperm(positions_total, generator=generator)[:k]
                                     for _ in range(len(x))]).to(device)
            picked = y.flatten(2).gather(2, positions[:, None, :].expand(-1, y.shape[1], -1))  # (B, N, k)
            yield _patch_rows(x, conv, positions), picked.permute(0, 2, 1).reshape(-1, y.shape[1])


def _collect(teacher, student, teacher_conv, new_layer, batches, calls, settings, layer_index) -> _Moments | None:
    conv = teacher_conv
    moments = _Moments.empty(conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1], conv.out_channels)
    for patches, targets in _samples(teacher, student, conv, new_layer, batches, calls, settings, layer_index):
        moments.add(patches, targets)
    return moments if moments.count else None


def _activation_targets(samples, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, gram: torch.Tensor):
    """One projection step of the ReLU-aware fit (Zhang et al., "Accelerating
    Very Deep Convolutional Networks for Classification and Detection", TPAMI
    2016, nonlinear response reconstruction). A BatchNorm ``a = scale * y +
    shift`` (the teacher's statistics) and a ReLU follow the layer. Where the
    teacher's activation is positive the target stays the teacher's output;
    where it is not, any output whose activation is not positive is as good,
    so the target becomes the layer's own prediction ``weight @ [u; 1]``
    projected onto that dead region. Returns the moments of (patch, new
    target) with ``gram`` reused, and the sum over samples of
    ``scale^2 * (target - prediction)^2``: the squared distance of the
    prediction's activations from the set of exact ones, an upper bound of
    the error after the ReLU (exact where the teacher's unit is off), and the
    sum of the teacher's squared activations after the ReLU."""
    moments = _Moments(gram, torch.zeros_like(weight.mT), torch.zeros(len(weight), dtype=torch.float64),
                       torch.zeros(len(weight), dtype=torch.float64))
    distance = energy = 0.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    boundary = -shift / safe  # the output at which the activation crosses zero
    for patches, targets in samples:
        features = _features(patches).cpu()
        targets = targets.double().cpu()
        predicted = features @ weight.mT
        active = scale * targets + shift > 0
        dead = scale * predicted + shift <= 0
        projected = torch.where(dead, predicted, boundary.expand_as(predicted))
        goal = torch.where(active, targets, projected)
        distance += (scale.square() * (goal - predicted).square()).sum().item()
        energy += (scale * targets + shift).clamp(min=0).square().sum().item()
        moments.cross += features.mT @ goal
        moments.target_sum += goal.sum(0)
        moments.target_square += goal.square().sum(0)
        moments.count += len(goal)
    return moments, distance, energy


# --------------------------------------------------------------- the solves
def _ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float, free_last: bool) -> torch.Tensor:
    """Solve (gram + ridge * mean diag * I) x = rhs for batched float64 systems;
    with ``free_last`` the last unknown (the bias) is not penalised."""
    size = gram.shape[-1]
    diagonal = gram.diagonal(dim1=-2, dim2=-1)
    scale = diagonal[..., : size - 1 if free_last and size > 1 else size].mean(-1).clamp(min=1e-12)
    penalty = torch.ones(size, dtype=gram.dtype)
    if free_last and size > 1:
        penalty[-1] = 1e-9  # keeps the system positive definite without biasing the bias
    system = gram.clone()
    system.diagonal(dim1=-2, dim2=-1).add_((ridge * scale)[..., None] * penalty + 1e-12)
    factor, info = torch.linalg.cholesky_ex(system)
    if bool((info == 0).all()):
        return torch.cholesky_solve(rhs, factor)
    return torch.linalg.lstsq(system, rhs).solution


def _augment(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(N, D+1): an effective weight with its bias (zeros without one)."""
    column = torch.zeros(len(weight), 1, dtype=torch.float64) if bias is None else bias.detach().double().cpu()[:, None]
    return torch.cat([weight.detach().double().cpu().reshape(len(weight), -1), column], 1)


def _effective_weight(layer: nn.Module, m: int, taps: int) -> torch.Tensor:
    """(N, D+1) effective dense weight and bias of a replaced layer."""
    if isinstance(layer, HetConv2d):
        return _augment(layer.dense_weight(), layer.bias)
    if isinstance(layer, (DSConv2d, GWPWConv2d)):
        spatial = layer.dw if isinstance(layer, DSConv2d) else layer.gw
        full = _spatial_full(spatial.weight.detach().double().cpu(), m, spatial.groups)  # (M', D)
        pw = layer.pw.weight.detach().double().cpu().flatten(1)
        bias = torch.zeros(len(pw), dtype=torch.float64)
        if layer.pw.bias is not None:
            bias = bias + layer.pw.bias.detach().double().cpu()
        if spatial.bias is not None:
            bias = bias + pw @ spatial.bias.detach().double().cpu()
        return torch.cat([pw @ full, bias[:, None]], 1)
    scaling = _blueprint_scaling(layer)  # BSConv-U/S: (N, M)
    blueprint = layer.dw.weight.detach().double().cpu().reshape(len(scaling), taps)
    weight = (scaling[:, :, None] * blueprint[:, None, :]).reshape(len(scaling), m * taps)
    return _augment(weight, layer.dw.bias)


def _blueprint_scaling(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, BSConvU2d):
        return layer.pw.weight.detach().double().cpu().flatten(1)
    return layer.pw2.weight.detach().double().cpu().flatten(1) @ layer.pw1.weight.detach().double().cpu().flatten(1)


def _spatial_full(weight: torch.Tensor, m: int, groups: int) -> torch.Tensor:
    """(M', M*T) dense form of a grouped KxK weight (M', M/groups, kh, kw)."""
    out, per_group = weight.shape[:2]
    taps = weight.shape[2] * weight.shape[3]
    full = torch.zeros(out, m, taps, dtype=weight.dtype)
    group_of = torch.arange(out) // (out // groups)
    channels = group_of[:, None] * per_group + torch.arange(per_group)  # (M', M/groups)
    full[torch.arange(out)[:, None], channels] = weight.reshape(out, per_group, taps)
    return full.reshape(out, m * taps)


def _fit_hetconv(layer: HetConv2d, moments: _Moments, settings: CalibrationSettings, free_bias: bool) -> torch.Tensor:
    """Per filter: ridge least squares over the entries its pattern keeps (and
    the bias, when the layer has one or ``free_bias``)."""
    n = layer.out_channels
    with_bias = layer.bias is not None or free_bias
    ones = torch.ones_like(layer.weight, dtype=torch.float64, device="cpu")
    ones_pw = torch.ones_like(layer.pointwise_weight, dtype=torch.float64, device="cpu")
    pattern = materialize_dense_weight(ones, ones_pw, layer.p, layer.layout).reshape(n, -1) != 0
    pattern = torch.cat([pattern, torch.full((n, 1), with_bias)], 1)  # (N, D+1)
    weight = torch.zeros(n, pattern.shape[1], dtype=torch.float64)
    unique, which = torch.unique(pattern, dim=0, return_inverse=True)
    for u, mask in enumerate(unique):
        filters = (which == u).nonzero().flatten()
        index = mask.nonzero().flatten()
        gram = moments.gram[index][:, index]
        rhs = moments.cross[index][:, filters]
        weight[filters[:, None], index[None, :]] = _ridge_solve(gram, rhs, settings.ridge, with_bias).mT
    return weight


def _fit_separable(layer: DSConv2d | GWPWConv2d, moments: _Moments, settings: CalibrationSettings, m: int,
                   taps: int, free_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """ALS on pw (with bias) and the grouped KxK weight. Returns (spatial
    (M', M/g*T), pw (N, M'), bias (N,), whether the KxK half was fitted)."""
    spatial = layer.dw if isinstance(layer, DSConv2d) else layer.gw
    groups, out = spatial.groups, spatial.out_channels
    per_group = m // groups
    s = spatial.weight.detach().double().cpu().reshape(out, per_group * taps)
    effective = _effective_weight(layer, m, taps)
    d = m * taps
    group_of = torch.arange(out) // (out // groups)
    index = ((group_of[:, None] * per_group + torch.arange(per_group))[:, :, None] * taps
             + torch.arange(taps)).reshape(out, per_group * taps)  # feature index of each S entry
    joint = out * per_group * taps <= settings.max_features
    gram, cross = moments.gram, moments.cross
    has_bias = layer.pw.bias is not None or free_bias
    pw = layer.pw.weight.detach().double().cpu().flatten(1)
    bias = effective[:, -1].clone()
    flat = index.reshape(-1)
    kxk_gram = gram[flat][:, flat].reshape(out, per_group * taps, out, per_group * taps) if joint else None
    for _ in range(max(1, settings.als_iterations)):
        # pointwise half: features z = S_full u (and 1)
        full = torch.zeros(out + 1, d + 1, dtype=torch.float64)
        full[torch.arange(out)[:, None], index] = s
        full[out, d] = 1.0
        keep = slice(None) if has_bias else slice(0, out)
        z_gram = (full @ gram @ full.mT)[keep, keep]
        z_cross = (full @ cross)[keep]
        solution = _ridge_solve(z_gram, z_cross, settings.ridge, has_bias).mT  # (N, M'(+1))
        pw = solution[:, :out]
        bias = solution[:, out] if has_bias else torch.zeros(len(pw), dtype=torch.float64)
        if not joint or settings.als_iterations == 0:
            break
        # KxK half: unknowns S[j, e]; H = (pw^T pw)[j, j'] * G[index(j, e), index(j', e')]
        outer = pw.mT @ pw  # (M', M')
        h = (kxk_gram * outer[:, None, :, None]).reshape(len(flat), len(flat))
        target = cross[:d] - gram[:d, d:d + 1] * bias[None, :]  # (D, N): sum u (y - b)
        rhs = (target[flat].reshape(out, per_group * taps, -1) * pw.mT[:, None, :]).sum(-1).reshape(-1, 1)
        s = _ridge_solve(h, rhs, settings.ridge, False).reshape(out, per_group * taps)
    return s, pw, bias, joint


def _fit_blueprint(layer: BSConvU2d | BSConvS2d, moments: _Moments, settings: CalibrationSettings, m: int,
                   taps: int, free_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per filter ALS on (pointwise row in the basis Q, blueprint, bias).
    Q = identity for BSConv-U, pw1's orthonormal rows for BSConv-S (kept)."""
    n = layer.out_channels
    basis = torch.eye(m, dtype=torch.float64) if isinstance(layer, BSConvU2d) else \
        layer.pw1.weight.detach().double().cpu().flatten(1)  # (r, M)
    coefficients = layer.pw.weight if isinstance(layer, BSConvU2d) else layer.pw2.weight  # (N, r)
    coefficients = coefficients.detach().double().cpu().flatten(1).clone()
    blueprint = layer.dw.weight.detach().double().cpu().reshape(n, taps)
    has_bias = layer.dw.bias is not None or free_bias
    bias = layer.dw.bias.detach().double().cpu() if layer.dw.bias is not None else torch.zeros(n, dtype=torch.float64)
    d = m * taps
    g4 = moments.gram[:d, :d].reshape(m, taps, m, taps)
    sums = moments.gram[:d, d].reshape(m, taps)  # sum u
    c4 = moments.cross[:d].reshape(m, taps, n)
    y_count = float(moments.count)
    tap_pairs = g4.permute(1, 3, 0, 2).reshape(taps * taps, m * m)  # G[:, t, :, s] for every (t, s)
    chunk = max(1, (64 << 20) // (8 * m * m * taps))
    for _ in range(max(1, settings.als_iterations)):
        for start in range(0, n, chunk):
            rows = slice(start, min(n, start + chunk))
            bp = blueprint[rows]  # (n', T)
            # pointwise half: features sum_t bp[t] u[c, t] in the basis, and 1
            # gram_c[n] = sum_{t,s} bp[n,t] bp[n,s] G[:, t, :, s]: one product over the T^2 tap pairs
            pairs = (bp[:, :, None] * bp[:, None, :]).reshape(len(bp), taps * taps)
            gram_c = (pairs @ tap_pairs).reshape(len(bp), m, m)
            gram_q = basis @ gram_c @ basis.mT  # (n', r, r)
            sum_q = torch.einsum("ct,nt->nc", sums, bp) @ basis.mT  # (n', r)
            rhs_q = torch.einsum("ctn,nt->nc", c4[:, :, rows], bp) @ basis.mT  # (n', r)
            solution = _bordered_solve(gram_q, sum_q, rhs_q, moments.target_sum[rows], y_count, has_bias, settings)
            coefficients[rows] = solution[:, :-1]
            bias[rows] = solution[:, -1]
            # blueprint half: features sum_c s[c] u[c, t], s = coefficients @ basis
            s = coefficients[rows] @ basis  # (n', M)
            # gram_t[n] = sum_{c,d} s[n,c] s[n,d] G[c, :, d, :]: a product over c, then over d per filter
            half = (s @ g4.reshape(m, taps * m * taps)).reshape(-1, taps, m, taps)
            gram_t = torch.einsum("ntds,nd->nts", half, s)  # (n', T, T)
            sum_t = torch.einsum("ct,nc->nt", sums, s)
            rhs_t = torch.einsum("ctn,nc->nt", c4[:, :, rows], s)
            solution = _bordered_solve(gram_t, sum_t, rhs_t, moments.target_sum[rows], y_count, has_bias, settings)
            blueprint[rows] = solution[:, :-1]
            bias[rows] = solution[:, -1]
    return coefficients, blueprint, bias


def _bordered_solve(gram, sums, rhs, target_sum, count, has_bias, settings) -> torch.Tensor:
    """Batched ridge solves of [[gram, sums], [sums^T, count]] [w; b] = [rhs; target_sum]
    (without the bias row when ``has_bias`` is False; b is then 0). Returns (n, k+1)."""
    n, k = rhs.shape
    if has_bias:
        system = torch.zeros(n, k + 1, k + 1, dtype=torch.float64)
        system[:, :k, :k] = gram
        system[:, :k, k] = sums
        system[:, k, :k] = sums
        system[:, k, k] = count
        right = torch.cat([rhs, target_sum[:, None]], 1)[..., None]
        return _ridge_solve(system, right, settings.ridge, True)[..., 0]
    solution = _ridge_solve(gram, rhs[..., None], settings.ridge, False)[..., 0]
    return torch.cat([solution, torch.zeros(n, 1, dtype=torch.float64)], 1)


# ------------------------------------------------------------ write back
def _write(parameter: torch.Tensor, value: torch.Tensor) -> None:
    parameter.copy_(value.reshape(parameter.shape).to(device=parameter.device, dtype=parameter.dtype))


def _fit(layer: nn.Module, moments: _Moments, settings: CalibrationSettings, m: int, taps: int, free_bias: bool):
    """Fit ``layer`` in place. Returns (method, effective weight after the fit,
    the bias a layer without one was fitted with (``free_bias``: it goes into
    the following BatchNorm) or None)."""
    method, extra = _fit_in_place(layer, moments, settings, m, taps, free_bias)
    weight = _effective_weight(layer, m, taps)
    if extra is not None:
        weight[:, -1] += extra
    return method, weight, extra


def _fit_in_place(layer, moments, settings, m, taps, free_bias):
    if isinstance(layer, HetConv2d):
        weight = _fit_hetconv(layer, moments, settings, free_bias)
        dense = weight[:, :-1].reshape(layer.dense_weight().shape)
        kxk, pointwise = extract_hetconv_weights(dense, layer.p, layer.layout, check_structure=False)
        _write(layer.weight, kxk)
        _write(layer.pointwise_weight, pointwise)
        if layer.bias is not None:
            _write(layer.bias, weight[:, -1])
        return "ridge least squares per filter", None if layer.bias is not None or not free_bias else weight[:, -1]
    if isinstance(layer, (DSConv2d, GWPWConv2d)):
        s, pw, bias, joint = _fit_separable(layer, moments, settings, m, taps, free_bias)
        spatial = layer.dw if isinstance(layer, DSConv2d) else layer.gw
        _write(spatial.weight, s)
        if spatial.bias is not None:
            spatial.bias.zero_()  # folded into the pointwise bias
        _write(layer.pw.weight, pw)
        if layer.pw.bias is not None:
            _write(layer.pw.bias, bias)
        method = (f"alternating least squares, {settings.als_iterations} iterations" if joint else
                  f"pointwise least squares (the joint KxK solve would have {spatial.weight.numel():,} unknowns > "
                  f"max_features={settings.max_features})")
        return method, None if layer.pw.bias is not None or not free_bias else bias
    coefficients, blueprint, bias = _fit_blueprint(layer, moments, settings, m, taps, free_bias)
    _write(layer.dw.weight, blueprint)
    if layer.dw.bias is not None:
        _write(layer.dw.bias, bias)
    if isinstance(layer, BSConvU2d):
        _write(layer.pw.weight, coefficients)
        method = f"alternating least squares per filter, {settings.als_iterations} iterations"
    else:
        _write(layer.pw2.weight, coefficients)
        method = f"alternating least squares per filter (pw2, blueprint; pw1 kept), {settings.als_iterations} iterations"
    return method, None if layer.dw.bias is not None or not free_bias else bias


def _why_not_fitted(layer: nn.Module, features: int, settings: CalibrationSettings) -> str:
    if not settings.fit:
        return "not fitted: fit=False"
    if not isinstance(layer, (HetConv2d, DSConv2d, GWPWConv2d, BSConvU2d, BSConvS2d)):
        return f"no fit for {type(layer).__name__}"
    if getattr(layer, "with_bn", False):
        return "not fitted: a BatchNorm inside the layer"
    if features > settings.max_features:
        return f"not fitted: {features:,} patch entries > max_features={settings.max_features:,}"
    return ""


# ------------------------------------------------------------- BatchNorm
_RELUS = {F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}
_INPLACE_RELUS = {F.relu_, torch.relu_, torch.Tensor.relu_}


def _tensors_in(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors_in(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors_in(item)]
    return []


class _Readers(TorchFunctionMode):
    """Records every torch function that reads a watched tensor (``watched``:
    key -> tensors) into ``readers[key]`` ("relu" for a ReLU). A tensor a
    ReLU overwrote in place stops being watched: later readers read the ReLU's
    output."""

    def __init__(self, watched: dict[int, list]) -> None:
        super().__init__()
        self.watched = watched
        self.readers: dict[int, set] = {key: set() for key in watched}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _tensors_in(args) + _tensors_in(kwargs)
        for key, seen in self.watched.items():
            for out in [out for out in seen if any(t is out for t in tensors)]:
                relu = func in _RELUS
                self.readers[key].add("relu" if relu else func)
                inplace = func in _INPLACE_RELUS or (func is F.relu and (kwargs.get("inplace") or args[1:2] == (True,)))
                if relu and inplace:
                    seen.remove(out)
        return func(*args, **kwargs)


def _batchnorm_after(student: nn.Module, layers: list[nn.Module], images: torch.Tensor) -> dict[int, tuple]:
    """For each layer whose every output goes straight into one BatchNorm2d:
    (name, bn, whether that BatchNorm's output is read only by a ReLU: a
    module or a function, in place or not)."""
    outputs: dict[int, list] = {id(layer): [] for layer in layers}
    consumers: dict[int, set] = {id(layer): set() for layer in layers}
    names = {id(module): name for name, module in student.named_modules()}
    bns = {id(m): m for m in student.modules() if isinstance(m, nn.BatchNorm2d)}
    bn_outputs: dict[int, list] = {key: [] for key in bns}
    handles = [layer.register_forward_hook(lambda m, a, out: outputs[id(m)].append(out)) for layer in layers]

    def check(bn, args):
        for key, seen in outputs.items():
            if any(args[0] is out for out in seen):
                consumers[key].add(id(bn))

    handles += [bn.register_forward_pre_hook(check) for bn in bns.values()]
    handles += [bn.register_forward_hook(lambda m, a, out: bn_outputs[id(m)].append(out)) for bn in bns.values()]
    readers = _Readers(bn_outputs)
    try:
        with torch.no_grad(), readers:
            student(images)
    finally:
        for handle in handles:
            handle.remove()
    found = {}
    for layer in layers:
        chosen = consumers[id(layer)]
        bn = bns[next(iter(chosen))] if len(chosen) == 1 else None
        if bn is not None and bn.track_running_stats and bn.running_mean is not None:
            found[id(layer)] = (names.get(id(bn), "batchnorm"), bn, readers.readers[id(bn)] == {"relu"})
    return found


def _bn_affine(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), float64: the BatchNorm's output is ``scale * x + shift`` with statistics (mean, var)."""
    features = len(mean)
    gamma = bn.weight.detach().double().cpu() if bn.affine else torch.ones(features, dtype=torch.float64)
    beta = bn.bias.detach().double().cpu() if bn.affine else torch.zeros(features, dtype=torch.float64)
    scale = gamma / (var + bn.eps).sqrt()
    return scale, beta - scale * mean


def _bn_decision(bn: nn.BatchNorm2d, weight: torch.Tensor, moments: _Moments, policy: str,
                 shift: torch.Tensor | None = None) -> tuple:
    """Errors of the BatchNorm's output against the teacher's with kept and with
    re-estimated statistics; re-estimates (in place) when that is lower
    (``policy="auto"``) or ``policy="always"``. ``weight`` (N, D+1) includes
    ``shift``, a fitted bias the layer itself lacks: kept statistics take it
    in their mean (running_mean - shift); re-estimated ones see the layer's
    real output (without it)."""
    n = moments.count
    mean_t = bn.running_mean.double().cpu()
    a_t, c_t = _bn_affine(bn, mean_t, bn.running_var.double().cpu())
    s_hat = weight @ moments.gram[:, -1]  # sum y_hat (the last gram column is sum [u; 1])
    s_hat2 = ((weight @ moments.gram) * weight).sum(1)
    s_hat_y = (weight * moments.cross.mT).sum(1)
    s_y, s_y2 = moments.target_sum, moments.target_square
    s_z = a_t * s_y + n * c_t
    s_z2 = a_t.square() * s_y2 + 2 * a_t * c_t * s_y + n * c_t.square()
    s_hat_z = a_t * s_hat_y + c_t * s_hat

    def error(a, c) -> float:
        squared = a.square() * s_hat2 + 2 * a * c * s_hat + n * c.square() - 2 * a * s_hat_z - 2 * c * s_z + s_z2
        total = s_z2.sum().item()
        return math.sqrt(max(squared.sum().item(), 0.0) / total) if total > 0 else 0.0

    mean = s_hat / n
    var = (s_hat2 / n - mean.square()).clamp(min=0)
    kept, reestimated = error(a_t, c_t), error(*_bn_affine(bn, mean, var))
    chosen = policy == "always" or (policy == "auto" and reestimated < kept)
    shift = torch.zeros_like(mean) if shift is None else shift.double().cpu()
    if chosen:
        bn.running_mean.copy_((mean - shift).to(bn.running_mean))
        bn.running_var.copy_((var * n / max(n - 1, 1)).to(bn.running_var))
    else:
        bn.running_mean.copy_((mean_t - shift).to(bn.running_mean))
    return kept, reestimated, chosen


def _reestimate_bn(student: nn.Module, bn: nn.BatchNorm2d, batches, device, dtype) -> None:
    """Set ``bn``'s running statistics to its inputs' mean and (unbiased)
    variance over every pixel of the calibration images."""
    total = torch.zeros(bn.num_features, dtype=torch.float64)
    square = torch.zeros(bn.num_features, dtype=torch.float64)
    count = 0
    for images in batches:
        for x in _run_until(student, images.to(device=device, dtype=dtype), bn, 1, pre=True):
            x = x.double().transpose(0, 1).reshape(bn.num_features, -1).cpu()
            total += x.sum(1)
            square += x.square().sum(1)
            count += x.shape[1]
    if count > 1:
        mean = total / count
        bn.running_mean.copy_(mean.to(bn.running_mean))
        bn.running_var.copy_(((square - count * mean.square()) / (count - 1)).clamp(min=0).to(bn.running_var))


def _refine_for_relu(samples, layer, bn, moments: _Moments, weight, extra, settings, m, taps, free_bias):
    """The ReLU-aware refinement (:func:`_activation_targets`) of a fitted layer
    followed by ``bn`` (the teacher's statistics) and a ReLU: alternate the
    projection step and the layer's own least-squares fit, and keep the
    weights with the smallest activation distance. ``samples()`` starts a new
    pass over the same sampled pixels. Returns (weight, extra, relative
    activation error before, after)."""
    scale, shift = _bn_affine(bn, bn.running_mean.double().cpu(), bn.running_var.double().cpu())
    best = None
    for step in range(settings.relu_iterations + 1):
        targets, distance, energy = _activation_targets(samples(), weight, scale, shift, moments.gram)
        if step == 0:
            first = distance
        if best is None or distance < best[0]:
            best = (distance, {k: v.clone() for k, v in layer.state_dict().items()}, weight, extra)
        if step == settings.relu_iterations:
            break
        _, weight, extra = _fit(layer, targets, settings, m, taps, free_bias)
    distance, state, weight, extra = best
    layer.load_state_dict(state)
    relative = (lambda d: math.sqrt(d / energy) if energy > 0 else 0.0)
    return weight, extra, relative(first), relative(distance)


# -------------------------------------------------------------- the driver
@torch.no_grad()
def calibrate(teacher: nn.Module, student: nn.Module, layers: list[tuple[nn.Conv2d, nn.Module, int]],
              calibration, settings: CalibrationSettings | None = None) -> list[LayerFit]:
    """Fit ``layers`` ((teacher's dense conv, student's replacement, calls per
    forward pass), in execution order) to the teacher on ``calibration`` images;
    returns one :class:`LayerFit` per layer. Both models run in eval mode;
    their train/eval flags are restored."""
    settings = settings or CalibrationSettings()
    batches = as_batches(calibration, settings.batch_size)
    flags = {m: m.training for m in (*teacher.modules(), *student.modules())}
    teacher.eval()
    student.eval()
    try:
        device = next((p.device for p in student.parameters()), torch.device("cpu"))
        dtype = next((p.dtype for p in student.parameters() if p.is_floating_point()), torch.float32)
        followers = _batchnorm_after(student, [new for _, new, _ in layers], batches[0].to(device=device, dtype=dtype))
        fits = []
        for index, (old, new, calls) in enumerate(layers):
            kh, kw = old.kernel_size
            m, taps = old.in_channels, kh * kw
            follower = followers.get(id(new))
            reason = _why_not_fitted(new, m * taps, settings) or (
                "" if calls else "not fitted: did not run on the calibration images")
            moments = None if reason else _collect(teacher, student, old, new, batches, calls, settings, index)
            if moments is None:
                fit = LayerFit(reason or "not fitted: did not run on the calibration images")
                if follower is not None and calls:
                    fit.batchnorm, fit.bn_reestimated = follower[0], True
                    _reestimate_bn(student, follower[1], batches, device, dtype)
                fits.append(fit)
                continue
            before = _effective_weight(new, m, taps)
            fit = LayerFit("", error_transfer=moments.relative_error(before), samples=moments.count)
            saved = {k: v.clone() for k, v in new.state_dict().items()}
            # A layer without a bias before a BatchNorm is fitted with one, folded into the BatchNorm's mean.
            free_bias = follower is not None
            fit.method, weight, extra = _fit(new, moments, settings, m, taps, free_bias)
            fit.error_fit = moments.relative_error(weight)
            if fit.error_fit >= fit.error_transfer:  # ridge or a poor sample: keep the transfer
                new.load_state_dict(saved)
                fit.method += " (not kept: no lower error than the transfer)"
                fit.error_fit, weight, extra = None, before, None
            refined = follower is not None and follower[2] and fit.error_fit is not None and settings.relu_iterations
            if refined:
                def samples():
                    return _samples(teacher, student, old, new, batches, calls, settings, index)

                weight, extra, fit.relu_error_linear, fit.relu_error_refined = _refine_for_relu(
                    samples, new, follower[1], moments, weight, extra, settings, m, taps, free_bias)
                fit.error_fit = moments.relative_error(weight)
                fit.method += f", ReLU-aware refinement ({settings.relu_iterations} passes)"
            if extra is not None:
                fit.method += " (with a bias, folded into the following BatchNorm)"
            if follower is not None:
                fit.batchnorm = follower[0]
                # the refinement fitted activations under the teacher's statistics: they stay
                policy = "always" if fit.error_fit is None else "never" if refined else settings.batchnorm
                fit.bn_error_kept, fit.bn_error_reestimated, fit.bn_reestimated = _bn_decision(
                    follower[1], weight, moments, policy, extra)
            fits.append(fit)
        return fits
    finally:
        for module, training in flags.items():
            module.training = training
