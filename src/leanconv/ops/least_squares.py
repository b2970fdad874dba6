"""Ridge least squares from moments, in float64: the solves of data-aware calibration
(:mod:`leanconv.conversion.calibrate`), which each layer kind uses to fit itself
(:meth:`leanconv.layers.LeanConvLayer.calibration_fit`).

Moments of (patch, target) pairs, feature index D the constant 1 of the bias:
``gram`` (D+1, D+1) = sum [u; 1][u; 1]^T, ``cross`` (D+1, N) = sum [u; 1] y^T,
``target_sum`` (N,) = sum y, ``count`` = the number of pairs.
"""

from __future__ import annotations

import torch

__all__ = ["augment", "bordered_solve", "ridge_solve"]


def ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float, free_last: bool) -> torch.Tensor:
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


def bordered_solve(gram, sums, rhs, target_sum, count, has_bias: bool, ridge: float) -> torch.Tensor:
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
        return ridge_solve(system, right, ridge, True)[..., 0]
    solution = ridge_solve(gram, rhs[..., None], ridge, False)[..., 0]
    return torch.cat([solution, torch.zeros(n, 1, dtype=torch.float64)], 1)


def augment(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(N, D+1) float64 on the CPU: a weight (N, ...) flattened, with its bias as the last
    column (zeros without one)."""
    column = torch.zeros(len(weight), 1, dtype=torch.float64) if bias is None else bias.detach().double().cpu()[:, None]
    return torch.cat([weight.detach().double().cpu().reshape(len(weight), -1), column], 1)
