"""Triton kernels for the direct HetConv: forward, input gradient, weight gradient.

HetConv (Singh et al., "HetConv: Heterogeneous Kernel-Based Convolutions for
Deep CNNs", CVPR 2019, https://arxiv.org/abs/1903.04120).

All three kernels work in *group order*: group-ordered channel ``c' = h*Mg + i``
is the i-th channel of group h, group-ordered filter ``n' = g*Ng + j`` the j-th
filter of group g. The two layouts differ only in where those live in memory::

    blocked: real channel = c'                 real filter = n'
    shifted: real channel = h + P*i            real filter = g + P*j

(``SHIFTED`` selects the mapping; see ``ops/hetconv_layout.py``). The weights
come packed by ``ops/hetconv_triton.py``:

* ``wk``: (P*KH*KW*Mg, Ng), row ``(g*KH*KW + tap)*Mg + i``: the KxK taps;
* ``wp``: (P*(M-Mg), Ng), row ``g*(M-Mg) + k``: the 1x1 weight of group g's
  filters on its k-th *other* channel, ``c' = k if k < g*Mg else k + Mg``.

No dense weight is materialised and the 1x1 part skips each group's own
channels, so every kernel does HetConv's own Ho*Wo*N*(Mg*KH*KW + M - Mg) MACs
per image (the input gradient works per stride phase and skips the taps that
miss a phase, see ``kernels/conv_common.py``). Accumulation is float32; tensors are addressed through
their strides, so NHWC (channels_last, the fast case: channel loads are
contiguous) and NCHW both work.

This module imports Triton; nothing in leanconv imports it unless Triton is
installed and the ``triton`` backend is asked for.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .conv_common import (
    INTERPRETED, output_pixels, phase_pixels, phase_tap, pixel_slice, tile_configs, variant_prune,
)

__all__ = ["hetconv_fwd_kernel", "hetconv_dx_kernel", "hetconv_dw_kernel"]

# (BLOCK_M pixels, BLOCK_N filters, BLOCK_K channels, warps, stages[, variant])
# Kept short: each configuration is a separate compile per dtype and geometry.
# _prune drops tiles wider than a group's filters (Ng) or, where a tile runs over
# one group's channels (forward, input gradient, aligned weight-gradient tiles),
# its channels (Mg): they would only multiply masked zeros. The forward has two variants of its
# reduction loop (see hetconv_fwd_kernel), tuned like the tiles: FLAT=False was
# measured on an H100 (notes/gpu_kernels.md); FLAT=True is not yet measured on a GPU.
_FWD_BLOCKS = [
    (128, 64, 64, 4, 3, {"FLAT": False}),
    (128, 128, 64, 8, 3, {"FLAT": False}),
    (128, 32, 32, 4, 4, {"FLAT": False}),
    (128, 64, 32, 4, 3, {"FLAT": False}),
    (128, 64, 32, 4, 4, {"FLAT": True}),
    (128, 128, 32, 8, 3, {"FLAT": True}),
    (64, 64, 32, 4, 4, {"FLAT": True}),
    (128, 32, 32, 4, 4, {"FLAT": True}),
]
# (BLOCK_M input pixels, BLOCK_C channels, BLOCK_N filters, warps, stages)
_DX_BLOCKS = [
    (128, 64, 64, 4, 3),
    (128, 128, 64, 8, 3),
    (128, 32, 32, 4, 4),
    (128, 64, 32, 4, 3),
]
# (BLOCK_R weight rows, BLOCK_N filters, BLOCK_Q pixels, warps, stages)
# ALIGNED (see hetconv_dw_kernel): tiles of rows within one tap, so their BLOCK_R is
# also pruned to the group's channels (Mg); not yet measured on a GPU.
_DW_BLOCKS = [
    (64, 64, 64, 4, 3, {"ALIGNED": False}),
    (128, 64, 64, 8, 3, {"ALIGNED": False}),
    (64, 32, 64, 4, 3, {"ALIGNED": False}),
    (64, 64, 64, 4, 3, {"ALIGNED": True}),
    (32, 64, 64, 4, 3, {"ALIGNED": True}),
    (32, 32, 64, 4, 3, {"ALIGNED": True}),
]


def _fits(size: int, block: int) -> bool:
    return block <= max(32, triton.next_power_of_2(size))


def _prune(channel_block: str | None, filter_block: str):
    def prune(configs, named_args, **kwargs):
        mg, ng = named_args["Mg"], named_args["Ng"]

        def fits(c):
            block = channel_block or ("BLOCK_R" if c.kwargs.get("ALIGNED") else None)
            return _fits(ng, c.kwargs[filter_block]) and (block is None or _fits(mg, c.kwargs[block]))

        return variant_prune(configs, fits)

    return {"early_config_prune": prune}


_SHAPE_KEY = ["B", "H", "W", "Ho", "Wo", "M", "N", "P", "KH", "KW"]


# The interpreter (Triton 3.9) computes bf16 x bf16 dots wrongly; under it the
# operands are upcast to float32 first, which changes nothing (the products of
# two bf16/fp16 values are exact in float32, and the GPU accumulates in float32).
_UPCAST_DOT_OPERANDS = tl.constexpr(INTERPRETED)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    if _UPCAST_DOT_OPERANDS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _real_channel(cg, Mg, P: tl.constexpr, SHIFTED: tl.constexpr):
    if SHIFTED:
        return (cg % Mg) * P + cg // Mg
    else:
        return cg


@triton.autotune(
    configs=tile_configs(_FWD_BLOCKS, ("BLOCK_M", "BLOCK_N", "BLOCK_K")), key=_SHAPE_KEY,
    prune_configs_by=_prune("BLOCK_K", "BLOCK_N"),
)
@triton.jit
def hetconv_fwd_kernel(
    x_ptr, wk_ptr, wp_ptr, bias_ptr, y_ptr,
    B, H, W, Ho, Wo, M, N, Mg, Ng,
    sxb, sxh, sxw, sxc, syb, syh, syw, syc,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    P: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SHIFTED: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FLAT: tl.constexpr,
):
    """y[pixel tile, filter tile of group g] = KxK taps on g's channels + centre 1x1 on the rest.

    The reduction runs over KH*KW*Mg KxK rows then M - Mg pointwise rows. FLAT=False:
    one loop over g's channels per tap (unrolled), then one over the others;
    with few channels per group each of these loops has one or two iterations,
    which leaves the software pipeline nothing to overlap. FLAT=True: a single
    loop over every (tap, channel chunk) step and the pointwise chunks, one
    BLOCK_K-deep step each, so loads of the next steps overlap the current dot
    (the loop shape of implicit-GEMM convolution kernels)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    tiles_n = tl.cdiv(Ng, BLOCK_N)
    g = pid_n // tiles_n
    j = (pid_n % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = j < Ng

    pix = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pix_ok = pix < B * Ho * Wo
    b, oh, ow = output_pixels(pix, Ho, Wo)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_img = x_ptr + b * sxb
    ck = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if FLAT:
        others = M - Mg
        kxk_chunks = tl.cdiv(Mg, BLOCK_K)
        kxk_steps = KH * KW * kxk_chunks
        centre = (KH // 2) * KW + KW // 2
        for step in range(0, kxk_steps + tl.cdiv(others, BLOCK_K)):
            is_kxk = step < kxk_steps
            tap = tl.where(is_kxk, step // kxk_chunks, centre)
            r = tl.where(is_kxk, (step % kxk_chunks) * BLOCK_K, (step - kxk_steps) * BLOCK_K) + ck
            r_ok = r < tl.where(is_kxk, Mg, others)
            cg = tl.where(is_kxk, g * Mg + r, tl.where(r < g * Mg, r, r + Mg))
            c = _real_channel(cg, Mg, P, SHIFTED)
            ih = ih0 + (tap // KW) * dil_h
            iw = iw0 + (tap % KW) * dil_w
            ok = pix_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xt = tl.load(x_img[:, None] + (ih * sxh + iw * sxw)[:, None] + c[None, :] * sxc,
                         mask=ok[:, None] & r_ok[None, :], other=0.0)
            w_rows = tl.where(is_kxk, wk_ptr + ((g * (KH * KW) + tap) * Mg + r) * Ng, wp_ptr + (g * others + r) * Ng)
            wt = tl.load(w_rows[:, None] + j[None, :], mask=r_ok[:, None] & j_ok[None, :], other=0.0)
            acc = _dot(xt, wt, acc, PRECISION)
    else:
        for tap in tl.static_range(KH * KW):
            ih = ih0 + (tap // KW) * dil_h
            iw = iw0 + (tap % KW) * dil_w
            ok = pix_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            base = x_img + ih * sxh + iw * sxw
            for c0 in range(0, Mg, BLOCK_K):
                i = c0 + ck
                i_ok = i < Mg
                c = _real_channel(g * Mg + i, Mg, P, SHIFTED)
                xt = tl.load(base[:, None] + c[None, :] * sxc, mask=ok[:, None] & i_ok[None, :], other=0.0)
                row = (g * (KH * KW) + tap) * Mg + i
                wt = tl.load(wk_ptr + row[:, None] * Ng + j[None, :], mask=i_ok[:, None] & j_ok[None, :], other=0.0)
                acc = _dot(xt, wt, acc, PRECISION)

        centre = (KH // 2) * KW + KW // 2
        ih = ih0 + (centre // KW) * dil_h
        iw = iw0 + (centre % KW) * dil_w
        ok = pix_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        base = x_img + ih * sxh + iw * sxw
        others = M - Mg
        for c0 in range(0, others, BLOCK_K):
            k = c0 + ck
            k_ok = k < others
            cg = tl.where(k < g * Mg, k, k + Mg)
            c = _real_channel(cg, Mg, P, SHIFTED)
            xt = tl.load(base[:, None] + c[None, :] * sxc, mask=ok[:, None] & k_ok[None, :], other=0.0)
            row = g * others + k
            wt = tl.load(wp_ptr + row[:, None] * Ng + j[None, :], mask=k_ok[:, None] & j_ok[None, :], other=0.0)
            acc = _dot(xt, wt, acc, PRECISION)

    n = _real_channel(g * Ng + j, Ng, P, SHIFTED)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + b[:, None] * syb + oh[:, None] * syh + ow[:, None] * syw + n[None, :] * syc
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=pix_ok[:, None] & j_ok[None, :])


@triton.autotune(
    configs=tile_configs(_DX_BLOCKS, ("BLOCK_M", "BLOCK_C", "BLOCK_N")), key=_SHAPE_KEY,
    prune_configs_by=_prune("BLOCK_C", "BLOCK_N"),
)
@triton.jit
def hetconv_dx_kernel(
    dy_ptr, wk_ptr, wp_ptr, dx_ptr,
    B, H, W, Ho, Wo, M, N, Mg, Ng,
    sdb, sdh, sdw, sdc, sxb, sxh, sxw, sxc,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    P: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SHIFTED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dx[input pixel tile of one stride phase, channel tile of group h]: KxK taps from
    h's filters, centre 1x1 from the others; taps that miss this phase are skipped."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    phase = tl.program_id(2)
    tiles_c = tl.cdiv(Mg, BLOCK_C)
    h = pid_c // tiles_c
    i = (pid_c % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    i_ok = i < Mg
    cg = h * Mg + i

    pix = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    b, ih, iw, pix_ok = phase_pixels(pix, phase, B, H, W, stride_h, stride_w)
    dy_img = dy_ptr + b * sdb
    cn = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)

    for tap in tl.static_range(KH * KW):
        hits, oh, ow, ok = phase_tap(phase, ih, iw, pix_ok, tap, KH, KW, Ho, Wo,
                                     stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)
        if hits:
            base = dy_img + oh * sdh + ow * sdw
            row = (h * (KH * KW) + tap) * Mg + i
            for j0 in range(0, Ng, BLOCK_N):
                j = j0 + cn
                j_ok = j < Ng
                n = _real_channel(h * Ng + j, Ng, P, SHIFTED)
                dyt = tl.load(base[:, None] + n[None, :] * sdc, mask=ok[:, None] & j_ok[None, :], other=0.0)
                wt = tl.load(wk_ptr + row[None, :] * Ng + j[:, None], mask=j_ok[:, None] & i_ok[None, :], other=0.0)
                acc = _dot(dyt, wt, acc, PRECISION)

    centre = (KH // 2) * KW + KW // 2
    hits, oh, ow, ok = phase_tap(phase, ih, iw, pix_ok, centre, KH, KW, Ho, Wo,
                                 stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)
    if hits:
        base = dy_img + oh * sdh + ow * sdw
        others = M - Mg
        for n0 in range(0, N - Ng, BLOCK_N):
            nn = n0 + cn
            nn_ok = nn < N - Ng
            ng = tl.where(nn < h * Ng, nn, nn + Ng)  # group-ordered filter of another group
            gcol = ng // Ng
            jcol = ng % Ng
            n = _real_channel(ng, Ng, P, SHIFTED)
            dyt = tl.load(base[:, None] + n[None, :] * sdc, mask=ok[:, None] & nn_ok[None, :], other=0.0)
            # channel cg is the k-th "other" channel of group gcol: k = cg, or cg - Mg past gcol's block
            k = tl.where(h < gcol[:, None], cg[None, :], cg[None, :] - Mg)
            wt = tl.load(wp_ptr + (gcol[:, None] * others + k) * Ng + jcol[:, None],
                         mask=nn_ok[:, None] & i_ok[None, :], other=0.0)
            acc = _dot(dyt, wt, acc, PRECISION)

    c = _real_channel(cg, Mg, P, SHIFTED)
    out = dx_ptr + b[:, None] * sxb + ih[:, None] * sxh + iw[:, None] * sxw + c[None, :] * sxc
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=pix_ok[:, None] & i_ok[None, :])


@triton.autotune(
    configs=tile_configs(_DW_BLOCKS, ("BLOCK_R", "BLOCK_N", "BLOCK_Q")),
    key=_SHAPE_KEY + ["SPLIT"],
    prune_configs_by=_prune(None, "BLOCK_N"),
)
@triton.jit
def hetconv_dw_kernel(
    x_ptr, dy_ptr, part_ptr,
    B, H, W, Ho, Wo, M, N, Mg, Ng, SPLIT, pixels_per_split,
    sxb, sxh, sxw, sxc, sdb, sdh, sdw, sdc,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    P: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SHIFTED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Partial weight gradient of group g over one slice of the output pixels.

    Rows r < KH*KW*Mg are the packed KxK weights (tap r // Mg, channel r % Mg),
    the following M - Mg rows the packed 1x1 weights; part[s, g, r, j] holds
    slice s's sum, reduced over s by the launcher (deterministic, no atomics).

    ALIGNED=False: a tile is BLOCK_R consecutive rows, which may span taps, so the
    input tile is gathered with a spatial offset per (row, pixel). ALIGNED=True:
    a tile holds rows of one tap only (the launcher's grid has KH*KW*cdiv(Mg,
    BLOCK_R) + cdiv(M - Mg, BLOCK_R) tiles per group): the offset is one per
    pixel and the tile is a plain channels x pixels slab of the shifted input.
    """
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    s = tl.program_id(2)
    kxk_rows = KH * KW * Mg
    others = M - Mg
    rows = kxk_rows + others
    centre = (KH // 2) * KW + KW // 2
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = j < Ng
    if ALIGNED:
        chunks = tl.cdiv(Mg, BLOCK_R)
        tiles_g = KH * KW * chunks + tl.cdiv(others, BLOCK_R)
        g = pid_r // tiles_g
        tile = pid_r % tiles_g
        tile_kxk = tile < KH * KW * chunks
        tap_s = tl.where(tile_kxk, tile // chunks, centre)
        i = tl.where(tile_kxk, (tile % chunks) * BLOCK_R, (tile - KH * KW * chunks) * BLOCK_R) + tl.arange(0, BLOCK_R)
        r_ok = i < tl.where(tile_kxk, Mg, others)
        r = tl.where(tile_kxk, tap_s * Mg + i, kxk_rows + i)
        cg = tl.where(tile_kxk, g * Mg + i, tl.where(i < g * Mg, i, i + Mg))
        kh_s = tap_s // KW
        kw_s = tap_s % KW
    else:
        tiles_r = tl.cdiv(rows, BLOCK_R)
        g = pid_r // tiles_r
        r = (pid_r % tiles_r) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = r < rows
        is_kxk = r < kxk_rows
        tap = tl.where(is_kxk, r // Mg, centre)
        kh = tap // KW
        kw = tap % KW
        k = r - kxk_rows
        cg = tl.where(is_kxk, g * Mg + r % Mg, tl.where(k < g * Mg, k, k + Mg))
    c = _real_channel(cg, Mg, P, SHIFTED)
    n = _real_channel(g * Ng + j, Ng, P, SHIFTED)

    start, stop = pixel_slice(s, pixels_per_split, B * Ho * Wo)
    cq = tl.arange(0, BLOCK_Q)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for q0 in range(start, stop, BLOCK_Q):
        q = q0 + cq
        q_ok = q < stop
        b, oh, ow = output_pixels(q, Ho, Wo)
        if ALIGNED:
            ih = oh * stride_h - pad_h + kh_s * dil_h
            iw = ow * stride_w - pad_w + kw_s * dil_w
            ok = q_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            pixel = b * sxb + ih * sxh + iw * sxw
            xt = tl.load(x_ptr + pixel[None, :] + c[:, None] * sxc, mask=r_ok[:, None] & ok[None, :], other=0.0)
        else:
            ih = oh[None, :] * stride_h - pad_h + kh[:, None] * dil_h
            iw = ow[None, :] * stride_w - pad_w + kw[:, None] * dil_w
            ok = q_ok[None, :] & r_ok[:, None] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xt = tl.load(x_ptr + b[None, :] * sxb + ih * sxh + iw * sxw + c[:, None] * sxc, mask=ok, other=0.0)
        dyt = tl.load(dy_ptr + b[:, None] * sdb + oh[:, None] * sdh + ow[:, None] * sdw + n[None, :] * sdc,
                      mask=q_ok[:, None] & j_ok[None, :], other=0.0)
        acc = _dot(xt, dyt, acc, PRECISION)

    out = part_ptr + ((s * P + g) * rows + r[:, None]) * Ng + j[None, :]
    tl.store(out, acc, mask=r_ok[:, None] & j_ok[None, :])
