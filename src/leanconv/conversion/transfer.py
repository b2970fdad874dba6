"""Weight transfer: initialise a replacement layer from the dense convolution
it replaces, in bounded memory and time.

Each kind's best approximation of the dense weight W (N, M, kh, kw):

* HetConv keeps each filter's KxK kernels on its own channels and the centre
  taps elsewhere: exact copies of W's entries (no arithmetic, no float64).
* DSC, GWC+PWC, BSConv-U and BSConv-S are low-rank factorisations, by the
  Eckart-Young theorem the truncated SVD of a family of small matrices: per
  input channel (DSC: N x kh*kw, rank = depth multiplier), per group (GWC+PWC:
  N x M/G*kh*kw, rank M/G), per filter (BSConv-U's blueprint: M x kh*kw,
  rank 1), then a rank-M' factor of BSConv-S's N x M scaling matrix (pw1 with
  orthonormal rows).

The factorisations are thin (never an a x a or b x b factor of an a x b
matrix beyond its smaller side) and run in float64 on chunks of the family so
that the float64 copies stay within :data:`CHUNK_BYTES`: the eigendecomposition
of the Gram matrix on the smaller side when that side is small (a 49 x 49 one
for a 7x7 kernel), else a thin SVD; a large matrix whose rank is far below its
sides uses a randomized range finder with power iterations (Halko, Martinsson
& Tropp, https://arxiv.org/abs/0909.4061) in the weight's own dtype, followed
by a float64 SVD of the small projected matrix.
A 7x7 512 -> 4096 convolution transfers in seconds (see tests/test_transfer.py).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from ..layers import BSConvS2d, BSConvU2d, DSConv2d, GWPWConv2d, HetConv2d
from ..ops.hetconv_layout import extract_hetconv_weights, pointwise_channel_index

__all__ = ["CHUNK_BYTES", "low_rank_factors", "transfer_weights"]

# Largest float64 copy of a chunk of matrices made at once.
CHUNK_BYTES = 64 << 20
# Matrices of at least this many elements whose rank is below half their
# smaller side are factorised by the randomized range finder.
RANDOMIZED_MIN_ELEMENTS = 1 << 22
_OVERSAMPLING, _POWER_ITERATIONS = 10, 2
# Smaller sides up to this go through the Gram matrix's eigendecomposition.
GRAM_MAX_SIDE = 1024


def _randomized_svd(matrix: torch.Tensor, rank: int, generator: torch.Generator):
    """Top-``rank`` thin SVD of one (a, b) matrix: range finder in the
    matrix's dtype, SVD of the small (q, b) projection in float64."""
    a, b = matrix.shape
    q = min(rank + _OVERSAMPLING, a, b)
    sketch = torch.randn(b, q, generator=generator, dtype=matrix.dtype).to(matrix.device)
    basis = torch.linalg.qr(matrix @ sketch).Q
    for _ in range(_POWER_ITERATIONS):
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.mT @ basis).Q).Q
    small = basis.mT.to(torch.float64) @ matrix.to(torch.float64)  # (q, b)
    with _one_thread():
        u_small, s, vh = torch.linalg.svd(small, full_matrices=False)
    return basis.to(torch.float64) @ u_small, s, vh


@contextlib.contextmanager
def _one_thread():
    """LAPACK on small matrices runs far slower on several threads: 41 eigh of
    49 x 49 took 2.25 s with torch's 2 threads and 0.03 s with one (torch 2.13,
    2-core EPYC). The big matrix products around them keep every thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _gram_svd(matrices: torch.Tensor, rank: int):
    """Top-``rank`` thin SVD of each float64 matrix of ``matrices`` (c, a, b)
    from the eigendecomposition of its Gram matrix on the smaller side
    (min(a, b) squared), the way to go for tall or wide matrices."""
    a, b = matrices.shape[-2:]
    k = min(a, b, rank)
    tall = b <= a
    gram = matrices.mT @ matrices if tall else matrices @ matrices.mT
    with _one_thread():
        eigenvalues, vectors = torch.linalg.eigh(gram)  # ascending
    vectors, s = vectors[..., -k:].flip(-1), eigenvalues[..., -k:].flip(-1).clamp(min=0).sqrt()
    inverse = torch.where(s > s[..., :1] * 1e-12, 1 / s.clamp(min=torch.finfo(s.dtype).tiny), torch.zeros_like(s))
    if tall:  # vectors are the right singular vectors
        return matrices @ vectors * inverse[..., None, :], s, vectors.mT
    return vectors, s, inverse[..., :, None] * (vectors.mT @ matrices)


def _thin_svd(chunk: torch.Tensor, chunk64: torch.Tensor, rank: int, generator: torch.Generator):
    """Top-``rank`` (u, s, vh) of each matrix of ``chunk`` (its float64 copy: ``chunk64``)."""
    a, b = chunk.shape[-2:]
    if 2 * rank < min(a, b) and a * b >= RANDOMIZED_MIN_ELEMENTS:
        parts = [_randomized_svd(matrix, rank, generator) for matrix in chunk]
        return tuple(torch.stack(part) for part in zip(*parts))
    if min(a, b) <= GRAM_MAX_SIDE:
        return _gram_svd(chunk64, rank)
    with _one_thread():
        return torch.linalg.svd(chunk64, full_matrices=False)


def _orthonormal_completion(rows: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` unit rows orthogonal to each other and to the orthonormal ``rows`` (..., k, b)."""
    b = rows.shape[-1]
    random = torch.randn(*rows.shape[:-2], b, count, generator=generator, dtype=rows.dtype).to(rows.device)
    random = random - rows.mT @ (rows @ random)
    return torch.linalg.qr(random).Q.mT


def low_rank_factors(
    matrices: torch.Tensor, rank: int, *, balanced: bool = True
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-``rank`` factors of each matrix of ``matrices`` (B, a, b):
    left (B, a, rank) @ right (B, rank, b), in float64, and the squared
    Frobenius norms of the residual and of the matrices, summed over the family.

    ``balanced``: both factors carry sqrt of the singular values; else the left
    one carries them and ``right`` has orthonormal rows. Where ``rank``
    exceeds what a matrix supports, ``right`` is completed with orthonormal
    rows and ``left`` gets zero columns, so no unit of the new layer is dead.
    """
    count, a, b = matrices.shape
    k = min(a, b, rank)
    left = torch.zeros(count, a, rank, dtype=torch.float64, device=matrices.device)
    right = torch.zeros(count, rank, b, dtype=torch.float64, device=matrices.device)
    residual = total = 0.0
    generator = torch.Generator().manual_seed(0)
    step = max(1, CHUNK_BYTES // (8 * a * b))
    for start in range(0, count, step):
        chunk = matrices[start : start + step]
        chunk64 = chunk.to(torch.float64)
        u, s, vh = _thin_svd(chunk, chunk64, rank, generator)
        u, s, vh = u[..., :k], s[..., :k], vh[..., :k, :]
        root = s.sqrt()
        left[start : start + step, :, :k] = u * (root if balanced else s)[..., None, :]
        right[start : start + step, :k] = vh * (root[..., :, None] if balanced else 1)
        if min(rank, b) > k:
            right[start : start + step, k : min(rank, b)] = _orthonormal_completion(vh, min(rank, b) - k, generator)
        # Measured, not ||A||^2 - sum(s^2): that difference loses all digits of a small residual.
        residual += (chunk64 - (u * s[..., None, :]) @ vh).square().sum().item()
        total += chunk64.square().sum().item()
    return left, right, residual, total


def _put(parameter: torch.Tensor, value: torch.Tensor) -> None:
    parameter.copy_(value.reshape(parameter.shape).to(parameter.dtype))


def _put_bias(conv: nn.Module, value: torch.Tensor | None) -> None:
    if conv.bias is not None:
        conv.bias.copy_(value.to(conv.bias.dtype) if value is not None else torch.zeros_like(conv.bias))


def _hetconv(weight: torch.Tensor, bias, new: HetConv2d) -> float:
    kxk, pointwise = extract_hetconv_weights(weight, new.p, new.layout, check_structure=False)
    _put(new.weight, kxk)
    _put(new.pointwise_weight, pointwise)
    _put_bias(new, bias)
    # The kept entries are W's own: the residual is the off-centre energy of each filter's 1x1 channels.
    n, m, kh, kw = weight.shape
    on_pointwise = torch.zeros(n, m, dtype=torch.bool, device=weight.device)
    on_pointwise.scatter_(1, pointwise_channel_index(m, n, new.p, new.layout, weight.device), True)
    residual = total = 0.0
    step = max(1, CHUNK_BYTES // (8 * m * kh * kw))
    for start in range(0, n, step):
        energy = weight[start : start + step].to(torch.float64).square()
        off_centre = energy.sum((2, 3)) - energy[:, :, kh // 2, kw // 2]
        residual += off_centre[on_pointwise[start : start + step]].sum().item()
        total += energy.sum().item()
    return residual, total


def _separable(weight: torch.Tensor, bias, new: DSConv2d | GWPWConv2d) -> float:
    # W[:, group g] (N, Mg*taps) ~ pw[:, outputs of g] (N, rank) @ kxk[outputs of g] (rank, Mg*taps)
    n, m, kh, kw = weight.shape
    spatial = new.dw if isinstance(new, DSConv2d) else new.gw
    groups = spatial.groups
    rank = spatial.out_channels // groups
    blocks = weight.reshape(n, groups, m // groups * kh * kw).permute(1, 0, 2)
    left, right, residual, total = low_rank_factors(blocks, rank)
    _put(spatial.weight, right)
    _put(new.pw.weight, left.permute(1, 0, 2))
    _put_bias(spatial, None)
    _put_bias(new.pw, bias)
    return residual, total


def _blueprint(weight: torch.Tensor, bias, new: BSConvU2d | BSConvS2d) -> float:
    # W[n] (M, taps) ~ scaling[n] (M, 1) @ blueprint[n] (1, taps)
    n, m, kh, kw = weight.shape
    left, blueprint, residual, total = low_rank_factors(weight.reshape(n, m, kh * kw), 1)
    scaling = left[:, :, 0]
    _put(new.dw.weight, blueprint)
    _put_bias(new.dw, bias)
    if isinstance(new, BSConvU2d):
        _put(new.pw.weight, scaling)
        return residual, total
    # scaling (N, M) ~ pw2 (N, M') @ pw1 (M', M), pw1 with orthonormal rows. The first
    # residual is orthogonal to every x (x) blueprint[n], so the two errors add up.
    pw2, pw1, _, _ = low_rank_factors(scaling[None], new.mid_channels, balanced=False)
    _put(new.pw1.weight, pw1[0])
    _put(new.pw2.weight, pw2[0])
    scaling_error = (scaling - pw2[0] @ pw1[0]).square().sum(1)
    return residual + (scaling_error * blueprint[:, 0].square().sum(1)).sum().item(), total


_TRANSFERS = {HetConv2d: _hetconv, DSConv2d: _separable, GWPWConv2d: _separable, BSConvU2d: _blueprint,
              BSConvS2d: _blueprint}


@torch.no_grad()
def transfer_weights(old: nn.Conv2d, new: nn.Module) -> float:
    """Initialise ``new`` (HetConv, DSC, GWPW, BSConv-U/S) from the dense
    convolution ``old``; return the relative Frobenius error
    ||W_new - W|| / ||W|| of the new layer's effective dense weight (inner BN
    as identity). An initialisation, not an equivalence, except where W
    already has the kind's structure (error 0 up to rounding)."""
    transfer = _TRANSFERS.get(type(new))
    if transfer is None:
        raise TypeError(f"no weight transfer into {type(new).__name__}; kinds with one: "
                        f"{', '.join(t.__name__ for t in _TRANSFERS)}")
    weight = old.weight.detach()
    bias = None if old.bias is None else old.bias.detach()
    residual, total = transfer(weight, bias, new)
    return math.sqrt(max(residual, 0.0) / total) if total > 0 else 0.0
