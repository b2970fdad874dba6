"""Truncated SVD of a family of small matrices, in bounded memory and time: the weight
transfer of the factorised kinds (DSC, GWC+PWC, BSConv-U/S) from a dense convolution
(:mod:`leanconv.conversion.transfer` states the method).

The factorisations are thin (never an a x a or b x b factor of an a x b matrix beyond
its smaller side) and run in float64 on chunks of the family so that the float64 copies
stay within :data:`CHUNK_BYTES`: the eigendecomposition of the Gram matrix on the
smaller side when that side is small, else a thin SVD; a large matrix whose rank is far
below its sides uses a randomized range finder with power iterations (Halko, Martinsson
& Tropp, https://arxiv.org/abs/0909.4061) in the weight's own dtype, followed by a
float64 SVD of the small projected matrix.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["CHUNK_BYTES", "low_rank_factors"]

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
