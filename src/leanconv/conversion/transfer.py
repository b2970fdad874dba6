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

import math

import torch
import torch.nn as nn

from ..layers import LeanConvLayer
from ..ops.low_rank import CHUNK_BYTES, low_rank_factors

__all__ = ["CHUNK_BYTES", "low_rank_factors", "transfer_weights"]


@torch.no_grad()
def transfer_weights(old: nn.Conv2d, new: nn.Module) -> float:
    """Initialise ``new`` (a leanconv layer: its
    :meth:`~leanconv.layers.LeanConvLayer.transfer_from_dense`) from the dense convolution ``old``; return the relative Frobenius error
    ||W_new - W|| / ||W|| of the new layer's effective dense weight (inner BN
    as identity). An initialisation, not an equivalence, except where W
    already has the kind's structure (error 0 up to rounding)."""
    if not isinstance(new, LeanConvLayer):
        raise TypeError(f"no weight transfer into {type(new).__name__}: not a leanconv layer kind")
    weight = old.weight.detach()
    bias = None if old.bias is None else old.bias.detach()
    residual, total = new.transfer_from_dense(weight, bias)
    return math.sqrt(max(residual, 0.0) / total) if total > 0 else 0.0
