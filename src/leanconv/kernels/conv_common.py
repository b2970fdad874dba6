"""What the convolution kernels share: tile configurations, and the indexing of
an input gradient by *stride phase*.

Input gradient of a convolution with stride s (per dimension): input position
``i`` receives ``dy[o] * w[k]`` for every tap ``k`` and output position ``o``
with ``o*s - pad + k*dil == i``, i.e. where ``i + pad - k*dil`` is a
non-negative multiple of ``s`` (and ``o < Ho``). Whether it is a multiple
depends only on ``i % s``, the pixel's *phase*. A program that holds pixels of
one phase only (``phase_pixels``) can therefore decide per tap, once for the
whole tile, whether the tap contributes (``phase_tap``), and skip it when it
does not: a 3x3 stride-2 layer visits 2.25 taps per pixel on average instead of
9 masked ones. For stride 1 there is one phase and every tap contributes.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

__all__ = [
    "INTERPRETED", "AUTOTUNE", "FORCED_VARIANT", "tile_configs", "variant_prune", "phase_count", "output_pixels",
    "pixel_slice", "phase_pixels", "phase_tap",
]

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# LEANCONV_TRITON_AUTOTUNE=0: the first configuration of each kernel variant only (quicker first calls).
AUTOTUNE = os.environ.get("LEANCONV_TRITON_AUTOTUNE", "1") != "0"


def tile_configs(blocks: list[tuple], names: tuple[str, str, str]) -> list[triton.Config]:
    """``triton.Config`` per (a, b, c, warps, stages[, variant]) row: the three tile
    sizes named by ``names``, and an optional dict of further constexpr switches
    (a kernel *variant*, e.g. ``{"FLAT": True}``), tuned like the tile sizes.

    Under the interpreter one small tile per variant (it times nothing; the
    prune hook of :func:`variant_prune` then keeps one); with
    ``LEANCONV_TRITON_AUTOTUNE=0`` the first row of each variant only."""
    def variant(row) -> dict:
        return dict(row[5]) if len(row) > 5 else {}

    if INTERPRETED or not AUTOTUNE:
        first: dict[tuple, tuple] = {}
        for row in blocks:
            first.setdefault(tuple(sorted(variant(row).items())), row)
        blocks = list(first.values())
        if INTERPRETED:
            blocks = [(16, 16, 16, 1, 1, variant(row)) for row in blocks]
    return [
        triton.Config({names[0]: row[0], names[1]: row[1], names[2]: row[2], **variant(row)},
                      num_warps=row[3], num_stages=row[4])
        for row in blocks
    ]


# Set by tests and benchmarks to run one kernel variant: e.g. {"FLAT": False}.
# Empty: the autotuner chooses on a GPU; under the interpreter (which must not
# benchmark) the first variant runs.
FORCED_VARIANT: dict = {}


def variant_prune(configs: list[triton.Config], keep=lambda config: True) -> list[triton.Config]:
    """Configurations that pass ``keep`` and match ``FORCED_VARIANT``; under the
    interpreter only the first of them (a single configuration is not benchmarked)."""
    kept = [c for c in configs if keep(c) and all(c.kwargs.get(k, v) == v for k, v in FORCED_VARIANT.items())]
    kept = kept or [c for c in configs if all(c.kwargs.get(k, v) == v for k, v in FORCED_VARIANT.items())] or configs
    return kept[:1] if INTERPRETED else kept


def phase_count(height: int, width: int, stride: tuple[int, int]) -> tuple[int, int]:
    """(pixels per image and phase, rounded up; number of phases) for an input
    gradient launch: grid = (cdiv(B * first, BLOCK_M), ..., second)."""
    per_phase = -(-height // stride[0]) * -(-width // stride[1])
    return per_phase, stride[0] * stride[1]


@triton.jit
def output_pixels(pix, Ho, Wo):
    """Output pixels number ``pix`` (row-major over batch, rows, columns):
    returns (image index as int64, oh, ow)."""
    ow = pix % Wo
    t = pix // Wo
    return (t // Ho).to(tl.int64), t % Ho, ow


@triton.jit
def pixel_slice(s, pixels_per_split, total):
    """[start, stop) of slice ``s`` of the ``total`` output pixels (weight-gradient kernels
    split the pixel reduction into slices that the launcher sums)."""
    start = s * pixels_per_split
    return start, tl.minimum(start + pixels_per_split, total)


@triton.jit
def phase_pixels(pix, phase, B, H, W, stride_h, stride_w):
    """Input pixels number ``pix`` of stride phase ``phase`` (= (ih % sh) * sw + iw % sw):
    returns (image index as int64, ih, iw, in range)."""
    rows = tl.cdiv(H, stride_h)
    cols = tl.cdiv(W, stride_w)
    a_w = pix % cols
    t = pix // cols
    a_h = t % rows
    b = (t // rows).to(tl.int64)
    ih = phase // stride_w + stride_h * a_h
    iw = phase % stride_w + stride_w * a_w
    ok = (pix < B * rows * cols) & (ih < H) & (iw < W)
    return b, ih, iw, ok


@triton.jit
def phase_tap(phase, ih, iw, pix_ok, tap, KH: tl.constexpr, KW: tl.constexpr, Ho, Wo,
              stride_h, stride_w, pad_h, pad_w, dil_h, dil_w):
    """For tap ``tap`` (= kh*KW + kw) and input pixels of one phase: (whether the tap
    reaches an output position for this phase at all, oh, ow, per-pixel mask)."""
    kh = tap // KW
    kw = tap % KW
    # Shifted by a multiple of the stride so that % sees a positive number.
    rest_h = (phase // stride_w + pad_h - kh * dil_h + stride_h * KH * dil_h) % stride_h
    rest_w = (phase % stride_w + pad_w - kw * dil_w + stride_w * KW * dil_w) % stride_w
    hits = (rest_h == 0) & (rest_w == 0)
    th = ih + pad_h - kh * dil_h
    tw = iw + pad_w - kw * dil_w
    oh = tl.where(th >= 0, th, 0) // stride_h
    ow = tl.where(tw >= 0, tw, 0) // stride_w
    ok = pix_ok & (th >= 0) & (tw >= 0) & (oh < Ho) & (ow < Wo)
    return hits, oh, ow, ok
