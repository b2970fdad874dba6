"""Weight transfer on a layer of a VGG-style conv-MLP head's size (7x7,
512 -> 4096, 392 MiB of float32 weights): every kind in seconds and within a
small multiple of the weight's own memory (the full-matrices SVD this replaced
asked for 64 GiB), and the building blocks on awkward shapes."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn

from leanconv.bench.memory import peak_allocated_bytes
from leanconv.conversion.pipeline import build
from leanconv.conversion.transfer import low_rank_factors, transfer_weights

KINDS = [("hetconv", dict(p=4)), ("dsc", {}), ("bsconv_u", {}), ("bsconv_s", {}), ("gwpw", dict(g=4))]


@pytest.fixture(scope="module")
def head_conv():
    conv = nn.Conv2d(512, 4096, 7, padding=3, device="meta").to_empty(device="cpu")
    with torch.no_grad():
        conv.weight.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
        conv.bias.zero_()
    return conv


@pytest.mark.parametrize("kind,options", KINDS, ids=[k for k, _ in KINDS])
@pytest.mark.slow
def test_large_head_transfers_in_bounded_memory_and_time(head_conv, kind, options):
    weight_bytes = head_conv.weight.numel() * head_conv.weight.element_size()
    new = build(head_conv, kind, options)
    errors = []
    start = time.perf_counter()
    peak = peak_allocated_bytes(lambda: errors.append(transfer_weights(head_conv, new)))
    seconds = time.perf_counter() - start
    assert peak <= 2 * weight_bytes, f"{kind}: {peak / 2**20:.0f} MiB for a {weight_bytes / 2**20:.0f} MiB weight"
    assert seconds < 60, f"{kind}: {seconds:.1f} s"  # a few seconds on 2 idle cores; slack for a busy machine
    assert 0 < errors[0] < 1  # a random weight has no low-rank structure: an initialisation, not a copy
    assert all(torch.isfinite(t).all() for t in new.parameters())


@pytest.mark.parametrize("shape,rank", [((3, 5, 7), 2), ((2, 9, 4), 6), ((1, 1, 1), 1), ((4, 6, 6), 6)],
                         ids=["tall-rank2", "rank-beyond-side", "1x1", "square-full-rank"])
@pytest.mark.parametrize("balanced", [True, False])
def test_low_rank_factors_match_a_reference_svd(shape, rank, balanced):
    generator = torch.Generator().manual_seed(3)
    matrices = torch.randn(*shape, generator=generator, dtype=torch.float64)
    left, right, residual, total = low_rank_factors(matrices, rank, balanced=balanced)
    assert left.shape == (shape[0], shape[1], rank) and right.shape == (shape[0], rank, shape[2])
    u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
    k = min(rank, *shape[1:])
    best = (u[..., :k] * s[..., None, :k]) @ vh[..., :k, :]
    torch.testing.assert_close(left @ right, best)  # Eckart-Young: the truncated SVD
    assert residual == pytest.approx((matrices - best).square().sum().item(), abs=1e-9)
    assert total == pytest.approx(matrices.square().sum().item())
    rows = right[..., : min(rank, shape[2]), :]
    if not balanced:  # orthonormal rows, completed beyond the matrix's rank
        torch.testing.assert_close(rows @ rows.mT, torch.eye(rows.shape[1], dtype=torch.float64).expand_as(rows @ rows.mT))
