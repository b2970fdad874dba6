#!/usr/bin/env python3
"""Every CPU form of one HetConv layer we tried, exact or not kept, timed side
by side against the dense convolution (inference, float32 unless named).

Forms (all exact unless said otherwise; each is gated against the dense
convolution with the materialised weight before timing):

* ``dense``: nn.Conv2d's path with the materialised weight (what ``reference`` runs);
* ``split``: grouped KxK conv + 1x1 conv + add (three passes);
* ``fused``: grouped KxK conv, then ``addmm_`` of the 1x1 GEMM into its output;
* ``packed``: oneDNN-packed grouped weight, the conv adding itself onto the GEMM
  result as a post-op;
* ``masked``: grouped KxK conv + oneDNN 1x1 conv with the masked dense weight,
  added in place (the seed computation made exact; cached weights);
* ``masked_postop``: the masked 1x1 conv first, then the grouped conv (packed
  weight) adding itself onto it as oneDNN's ``add`` post-op (one pass less);
* ``fold_centre``: every centre tap in the 1x1 part (a full dense 1x1 conv)
  and the grouped conv with zero centre taps: the same MACs, moved;
* ``fused_groupwise_gemm``: the 1x1 part as 2P-1 GEMMs over each group's other
  channels (no block-diagonal zeros computed);
* ``coarse_groups``: the grouped conv run with P/2 groups, the 1x1 weights inside
  each coarse group folded into its centre taps, the GEMM over the rest;
* ``sparse_pointwise``: the 1x1 part as a CSR sparse matrix product;
* ``leanconv_split``: ``HetConv2d(backend="split")`` in eager inference (cached
  weights; on channels-last the masked post-op form);
* ``masked_bfloat16`` / ``dense_bfloat16``: the same in
  bfloat16 (the gate uses the bfloat16 tolerance);
* ``part_grouped_conv`` / ``part_pointwise_gemm`` / ``part_pointwise_conv``: the
  library calls of the fused and masked forms alone (not HetConv, not gated), to
  read each primitive's GMAC/s.

    python benchmarks/cpu_forms.py --out results/cpu/<machine>-forms-b64
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
import torch.nn.functional as F

from leanconv.bench import describe_environment, machine_slug, time_interleaved, write_results
from leanconv import HetConv2d
from leanconv.ops import onednn
from leanconv.ops.hetconv_layout import materialize_dense_weight, zero_diagonal_pointwise


def rows_view(t):
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def forms(x, weight, pointwise, p):
    n, per_group = weight.shape[:2]
    m = per_group * p
    dense = materialize_dense_weight(weight, pointwise, p, "blocked")
    matrix = zero_diagonal_pointwise(pointwise, m, pointwise.shape[0], p, "blocked")
    matrix_t = matrix.t().contiguous()
    one_by_one = matrix[:, :, None, None].contiguous(memory_format=torch.channels_last)
    grouped_packed = onednn.prepack(weight, (1, 1), (1, 1), (1, 1), p, x.shape)

    def fused():  # grouped conv, then the 1x1 GEMM accumulated into its output (channels-last rows view)
        y = F.conv2d(x, weight, None, 1, 1, 1, p).contiguous(memory_format=torch.channels_last)
        rows_view(y).addmm_(rows_view(x), matrix_t)
        return y

    def packed():  # the GEMM first, the packed grouped conv adding itself onto it (oneDNN post-op)
        acc = rows_view(x).mm(matrix_t).view(x.shape[0], x.shape[2], x.shape[3], -1).permute(0, 3, 1, 2)
        return onednn.conv2d_accumulate_(acc, x, grouped_packed, (1, 1), (1, 1), (1, 1), p)

    layer = HetConv2d(m, n, 3, padding=1, bias=False, p=p, backend="split").eval()
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.pointwise_weight.copy_(pointwise)

    def library():  # leanconv's split backend as HetConv2d runs it (cached; oneDNN post-op on channels-last)
        with torch.no_grad():
            return layer(x)

    out = {
        "dense": lambda: F.conv2d(x, dense, None, 1, 1),
        "split": lambda: F.conv2d(x, weight, None, 1, 1, 1, p) + F.conv2d(x, matrix[:, :, None, None]),
        "fused": fused,
        "packed": packed,
        "masked": lambda: F.conv2d(x, weight, None, 1, 1, 1, p).add_(F.conv2d(x, one_by_one)),
        "leanconv_split": library,
    }

    def masked_postop():
        acc = F.conv2d(x, one_by_one)
        return onednn.conv2d_accumulate_(acc, x, grouped_packed, (1, 1), (1, 1), (1, 1), p)

    out["masked_postop"] = masked_postop
    centre_free = weight.clone()
    centre_free[:, :, 1, 1] = 0
    full_one_by_one = dense[:, :, 1:2, 1:2].contiguous(memory_format=torch.channels_last)
    out["fold_centre"] = lambda: F.conv2d(x, centre_free, None, 1, 1, 1, p).add_(F.conv2d(x, full_one_by_one))
    ng = n // p
    pieces = []
    for g in range(p):
        columns = slice(g * ng, (g + 1) * ng)
        for rows in (slice(0, g * per_group), slice((g + 1) * per_group, m)):
            if rows.stop > rows.start:
                pieces.append((rows, columns, matrix_t[rows, columns].contiguous()))

    def groupwise():
        y = F.conv2d(x, weight, None, 1, 1, 1, p)
        y_rows, x_rows = rows_view(y), rows_view(x)
        for rows, columns, w in pieces:
            y_rows[:, columns].addmm_(x_rows[:, rows], w)
        return y

    out["fused_groupwise_gemm"] = groupwise
    if p % 2 == 0 and p > 2:
        coarse = p // 2
        mc, nc = m // coarse, n // coarse
        inside = torch.zeros(n, m, dtype=torch.bool)
        for f in range(n):
            inside[f, (f // nc) * mc:(f // nc + 1) * mc] = True
        folded = dense.clone()
        coarse_weight = torch.stack([folded[f, (f // nc) * mc:(f // nc + 1) * mc] for f in range(n)])
        rest_t = (matrix * ~inside).t().contiguous()

        def coarse_groups():
            y = F.conv2d(x, coarse_weight, None, 1, 1, 1, coarse)
            rows_view(y).addmm_(rows_view(x), rest_t)
            return y

        out["coarse_groups"] = coarse_groups
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = matrix.to_sparse_csr()

    def sparse_pointwise():
        y = F.conv2d(x, weight, None, 1, 1, 1, p)
        rows_view(y).add_(torch.sparse.mm(sparse, rows_view(x).t()).t())
        return y

    out["sparse_pointwise"] = sparse_pointwise
    xb, wb, pb, db = x.bfloat16(), weight.bfloat16(), pointwise.bfloat16(), dense.bfloat16()
    out["dense_bfloat16"] = lambda: F.conv2d(xb, db, None, 1, 1)
    matrix_b = zero_diagonal_pointwise(pb, m, pb.shape[0], p, "blocked")[:, :, None, None]
    out["masked_bfloat16"] = lambda: F.conv2d(xb, wb, None, 1, 1, 1, p).add_(F.conv2d(xb, matrix_b))
    return out


def parts(x, weight, pointwise, p):
    """The two halves of the fused form alone (not HetConv; not gated): how fast
    each library primitive runs."""
    m = weight.shape[1] * p
    matrix = zero_diagonal_pointwise(pointwise, m, pointwise.shape[0], p, "blocked")
    matrix_t = matrix.t().contiguous()
    one_by_one = matrix[:, :, None, None].contiguous(memory_format=torch.channels_last)
    return {
        "part_grouped_conv": lambda: F.conv2d(x, weight, None, 1, 1, 1, p),
        "part_pointwise_gemm": lambda: rows_view(x).mm(matrix_t),
        "part_pointwise_conv": lambda: F.conv2d(x, one_by_one),
    }


def form_macs(name, batch, size, channels, p):
    """MACs each form computes per call (its own count)."""
    per_output = {
        "dense": channels * 9, "dense_bfloat16": channels * 9,
        "part_grouped_conv": channels // p * 9, "part_pointwise_gemm": channels, "part_pointwise_conv": channels,
        "fused_groupwise_gemm": channels // p * 9 + channels - channels // p,
        "coarse_groups": channels // (p // 2) * 9 + channels - channels // (p // 2) if p > 2 else None,
    }.get(name, channels // p * 9 + channels)
    return None if per_output is None else batch * size * size * channels * per_output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--shapes", default="64x32,128x16,256x8,512x4,512x2", help="CHANNELSxSIZE,...")
    parser.add_argument("--p", default="4,8")
    parser.add_argument("--out", default=None, help="output stem (default OUT_DIR/<machine>-forms-b<batch>)")
    parser.add_argument("--out-dir", default="results/cpu", help="folder for the default output stem")
    args = parser.parse_args(argv)
    header = describe_environment()
    rows = []
    torch.manual_seed(0)
    for shape in args.shapes.split(","):
        channels, size = (int(v) for v in shape.split("x"))
        for p in (int(v) for v in args.p.split(",")):
            print(f"  M=N={channels} {size}x{size} P={p}", file=sys.stderr, flush=True)
            x = torch.randn(args.batch, channels, size, size).contiguous(memory_format=torch.channels_last)
            weight = torch.randn(channels, channels // p, 3, 3) / (channels ** 0.5)
            pointwise = torch.randn(channels, channels - channels // p) / (channels ** 0.5)
            candidates = forms(x, weight, pointwise, p)
            with torch.no_grad():
                reference = candidates["dense"]()
                gates = {}
                for name, run in candidates.items():
                    tolerance = 2e-2 if "bfloat16" in name else 1e-4
                    error = (run().float() - reference).abs().max().item() / max(1.0, reference.abs().max().item())
                    gates[name] = (error, error <= tolerance)
                timed = {k: v for k, v in candidates.items() if gates[k][1]}
                extra = parts(x, weight, pointwise, p)
                timings = time_interleaved({**timed, **extra}, repeats=args.repeats)
                for name in extra:
                    gates[name] = (None, True)
                candidates = {**candidates, **extra}
            for name in candidates:
                timing = timings.get(name)
                gate_error, passed = gates[name]
                row = {"config": f"M{channels}-N{channels}-{size}x{size}-P{p}-B{args.batch}", "form": name,
                       "gate_error": gate_error, "gate": "n/a" if gate_error is None else "pass" if passed else "FAIL",
                       "macs": form_macs(name, args.batch, size, channels, p)}
                if timing:
                    row.update(median_ms=timing.median * 1e3, min_ms=timing.minimum * 1e3, spread=timing.spread,
                               speedup_vs_dense=timings["dense"].median / timing.median,
                               gmacs=row["macs"] / timing.median / 1e9 if row["macs"] else None)
                rows.append(row)
    stem = args.out or os.path.join(args.out_dir, f"{machine_slug(header)}-forms-b{args.batch}")
    columns = ["config", "form", "gate", "median_ms", "min_ms", "spread", "speedup_vs_dense", "macs", "gmacs"]
    for path in write_results(stem, header=header, config={**vars(args), "what": "forms"}, rows=rows, columns=columns,
                              title=f"CPU forms of one HetConv layer (inference, batch {args.batch})",
                              notes=["times in ms per call, medians of interleaved rounds; all forms gated against dense"]):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
