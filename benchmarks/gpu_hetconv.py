"""The Triton HetConv kernels on a GPU: correctness, then speed against cuDNN.

HetConv (Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120). One run:

1. correctness: small random configurations (both layouts, stride, padding,
   dilation, K = 1/3/5, bias, NCHW and NHWC, float32/TF32, bfloat16, float16):
   output and every gradient of the ``triton`` backend against a float64
   reference on the GPU, under the tolerance policy of tests/helpers.py;
   torch.compile and autocast (AMP) smoke checks;
2. speed: VGG-16 and ResNet layer shapes at batch 128, channels_last, bf16 and
   TF32, forward and forward+backward (input and both weight gradients), for
   cuDNN's dense KxK convolution, the grouped+1x1 decomposition (grouped KxK conv
   + dense 1x1 conv, two cuDNN calls), leanconv's ``split`` backend and the
   ``triton`` backend. The triton candidate is gated: its forward output at the
   timed shape must match ``split``'s to 2e-2 relative (Frobenius) before it is timed.

Times are medians of ``triton.testing.do_bench`` (CUDA events). TFLOP/s are
*useful* FLOPs: 2 x HetConv's MACs, B*Ho*Wo*N*(M/P*K*K + M - M/P), over the
time (x3 for forward+backward); the dense convolution's own rate (2 x its
B*Ho*Wo*N*M*K*K MACs) is printed beside it.

    python benchmarks/gpu_hetconv.py --out results/gpu   # writes <gpu>-hetconv-p4-b128.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from gpu_common import machine_name, make_timer, pick_device, run_header, slug  # noqa: E402

from leanconv.bench import write_atomic  # noqa: E402
from leanconv.accounting import hetconv_macs_per_output  # noqa: E402
from leanconv.functional import het_conv2d  # noqa: E402
from leanconv.kernels import conv_common  # noqa: E402
from leanconv.kernels.hetconv import hetconv_dw_kernel, hetconv_dx_kernel, hetconv_fwd_kernel  # noqa: E402
from leanconv.ops.hetconv_triton import hetconv_triton  # noqa: E402


def hetconv_split(x, weight, pointwise, bias, stride, padding, dilation, p, layout):
    """The split backend through the dispatch path (grouped KxK + zero-diagonal 1x1)."""
    return het_conv2d(x, weight, pointwise, bias, stride, padding, dilation, p=p, layout=layout, backend="split")


def hetconv_reference(x, weight, pointwise, bias, stride, padding, dilation, p, layout):
    """The reference backend: one dense convolution with the materialised weight."""
    return het_conv2d(x, weight, pointwise, bias, stride, padding, dilation, p=p, layout=layout, backend="reference")

# (name, M, N, H=W, stride) at K=3, padding=1
SHAPES = {
    "vgg16": [
        ("conv2_2", 128, 128, 112, 1),
        ("conv3_2", 256, 256, 56, 1),
        ("conv4_2", 512, 512, 28, 1),
        ("conv5_2", 512, 512, 14, 1),
    ],
    "resnet": [
        ("layer1", 64, 64, 56, 1),
        ("layer2", 128, 128, 28, 1),
        ("layer2_s2", 64, 128, 56, 2),
        ("layer3", 256, 256, 14, 1),
        ("layer4", 512, 512, 7, 1),
    ],
    "smoke": [("tiny_s2", 8, 16, 7, 2)],
}
# Set by main(): "cuda", or "cpu" for --smoke runs under TRITON_INTERPRET=1.
DEVICE = "cuda"
TIMER = None
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


# ----------------------------------------------------------------------------- correctness
def check_correctness(log, dtypes=(torch.float32, torch.bfloat16, torch.float16), limit=None) -> bool:
    torch.manual_seed(0)
    configs = [
        # B, M, N, H, W, K, p, layout, stride, padding, dilation, bias, channels_last
        (3, 16, 16, 9, 11, 3, 4, "blocked", (1, 1), (1, 1), (1, 1), True, True),
        (2, 12, 24, 10, 7, 3, 4, "shifted", (2, 1), (1, 0), (1, 2), True, True),
        (2, 32, 64, 8, 8, 5, 2, "blocked", (2, 2), (2, 2), (1, 1), False, False),
        (1, 96, 48, 6, 9, 3, 8, "shifted", (1, 1), (2, 1), (2, 1), True, True),
        (2, 8, 8, 5, 5, 1, 2, "blocked", (1, 1), (0, 0), (1, 1), True, True),
        (4, 128, 128, 14, 14, 3, 4, "blocked", (1, 1), (1, 1), (1, 1), True, True),
        (2, 64, 128, 15, 15, 3, 4, "blocked", (2, 2), (1, 1), (1, 1), False, True),
        # 64 channels and filters per group: the wide tiles and the aligned weight-gradient tiles run
        (2, 256, 256, 8, 8, 3, 4, "shifted", (1, 1), (1, 1), (1, 1), True, True),
    ]
    if DEVICE == "cpu":  # smoke run on the interpreter: one small configuration
        configs = [(2, 8, 8, 5, 5, 3, 4, "shifted", (2, 1), (1, 1), (1, 1), True, True)]
    configs = configs[:limit]
    ok_all = True
    for dtype in dtypes:
        for cfg in configs:
            b, m, n, h, w, k, p, layout, stride, padding, dilation, with_bias, cl = cfg
            x64 = torch.randn(b, m, h, w, device=DEVICE, dtype=torch.float64)
            w64 = torch.randn(n, m // p, k, k, device=DEVICE, dtype=torch.float64) / (m // p * k * k) ** 0.5
            pw64 = torch.randn(n, m - m // p, device=DEVICE, dtype=torch.float64) / m**0.5
            b64 = torch.randn(n, device=DEVICE, dtype=torch.float64) if with_bias else None
            args = (stride, padding, dilation, p, layout)

            def run(fn, dt):
                leaves = [t.to(dt).detach().requires_grad_() if t is not None else None for t in (x64, w64, pw64, b64)]
                xin = leaves[0]
                if cl:
                    xin = xin.to(memory_format=torch.channels_last)
                y = fn(xin, leaves[1], leaves[2], leaves[3], *args)
                torch.manual_seed(1)
                gy = torch.randn(y.shape, device=DEVICE, dtype=torch.float64)
                grads = torch.autograd.grad(y, [t for t in leaves if t is not None], gy.to(dt))
                return [y, *grads]

            ref = run(hetconv_reference, torch.float64)
            base = run(hetconv_reference, dtype)  # torch's own dense conv in this dtype
            fast = run(hetconv_triton, dtype)
            names = ["y", "dx", "dw", "dpw", "dbias"]
            for name, f, t, r in zip(names, fast, base, ref):
                fast_err = (f.double() - r).abs().max().item()
                base_err = (t.double() - r).abs().max().item()
                bound = 2 * base_err + ATOL[dtype] * max(1.0, r.abs().max().item())
                good = bool(torch.isfinite(f).all()) and fast_err <= bound
                ok_all &= good
                if not good:
                    log(f"FAIL {dtype} {cfg} {name}: err {fast_err:.3g} > bound {bound:.3g}")
    log(f"correctness (output and all gradients, {len(configs)} configs x {dtypes}, "
        f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}): {'PASS' if ok_all else 'FAIL'}")
    if limit is not None:
        return ok_all

    # autocast (AMP): float32 leaves, bf16 compute, gradients flow back to float32 parameters
    x = torch.randn(4, 64, 16, 16, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()
    wt = torch.randn(64, 16, 3, 3, device=DEVICE, requires_grad=True)
    pw = torch.randn(64, 48, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = hetconv_triton(x, wt, pw, None, (1, 1), (1, 1), (1, 1), 4, "blocked")
        r = hetconv_reference(x, wt, pw, None, (1, 1), (1, 1), (1, 1), 4, "blocked")
    y.float().sum().backward()
    amp_ok = y.dtype == torch.bfloat16 and wt.grad.dtype == torch.float32
    amp_err = ((y.float() - r.float()).norm() / r.float().norm()).item()
    log(f"autocast bf16: output {y.dtype}, weight grad {wt.grad.dtype}, rel err vs autocast reference {amp_err:.2e}: "
        f"{'PASS' if amp_ok and amp_err < 2e-2 else 'FAIL'}")

    # torch.compile around the backend (graph breaks allowed; the result must match)
    try:
        def f(x, wt, pw):
            return torch.relu(hetconv_triton(x, wt, pw, None, (1, 1), (1, 1), (1, 1), 4, "blocked")) * 2

        compiled = torch.compile(f)
        xc = x.detach().requires_grad_()
        yc = compiled(xc, wt, pw)
        yc.sum().backward()
        ye = f(x.detach(), wt, pw)
        err = ((yc - ye).norm() / ye.norm()).item()
        log(f"torch.compile: rel err {err:.2e}, input grad {'present' if xc.grad is not None else 'MISSING'}: "
            f"{'PASS' if err < 1e-3 and xc.grad is not None else 'FAIL'}")
        try:
            explained = torch._dynamo.explain(f)(x.detach(), wt, pw)
            log(f"torch.compile: {explained.graph_count} graph(s), {explained.graph_break_count} graph break(s)")
        except Exception as error:  # explain is best-effort
            log(f"torch._dynamo.explain failed: {type(error).__name__}: {error}")
    except Exception as error:
        log(f"torch.compile: FAIL ({type(error).__name__}: {str(error)[:300]})")
    return ok_all


# ----------------------------------------------------------------------------- speed
def hetconv_macs(b, m, n, ho, wo, k, p):
    return b * ho * wo * n * hetconv_macs_per_output(m, k * k, p)


def bench_shape(name, m, n, hw, stride, dtype, p, batch, k, log):
    torch.manual_seed(0)
    pad = k // 2
    x = torch.randn(batch, m, hw, hw, device=DEVICE, dtype=dtype).to(memory_format=torch.channels_last)
    ho = (hw + 2 * pad - k) // stride + 1
    mg = m // p
    w_het = (torch.randn(n, mg, k, k, device=DEVICE, dtype=dtype) / (mg * k * k) ** 0.5).requires_grad_()
    pw = (torch.randn(n, m - mg, device=DEVICE, dtype=dtype) / m**0.5).requires_grad_()
    w_dense = (torch.randn(n, m, k, k, device=DEVICE, dtype=dtype) / (m * k * k) ** 0.5).requires_grad_()
    w_group = (torch.randn(n, mg, k, k, device=DEVICE, dtype=dtype) / (mg * k * k) ** 0.5).requires_grad_()
    w_1x1 = (torch.randn(n, m, 1, 1, device=DEVICE, dtype=dtype) / m**0.5).requires_grad_()
    x.requires_grad_()
    geometry = ((stride, stride), (pad, pad), (1, 1), p, "blocked")

    candidates = {
        "dense": (lambda: F.conv2d(x, w_dense, None, stride, pad), [x, w_dense]),
        "decomp": (lambda: F.conv2d(x, w_group, None, stride, pad, groups=p) + F.conv2d(x, w_1x1, None, stride),
                   [x, w_group, w_1x1]),
        "split": (lambda: hetconv_split(x, w_het, pw, None, *geometry), [x, w_het, pw]),
        "triton": (lambda: hetconv_triton(x, w_het, pw, None, *geometry), [x, w_het, pw]),
    }
    with torch.no_grad():
        y_split = candidates["split"][0]().float()
        y_triton = candidates["triton"][0]().float()
    rel = ((y_triton - y_split).norm() / y_split.norm()).item()
    gated = rel < 2e-2
    row = {"layer": name, "M": m, "N": n, "H": hw, "stride": stride, "dtype": str(dtype).replace("torch.", ""),
           "triton_vs_split_rel_err": rel, "gate": gated}
    if not gated:
        log(f"GATE FAILED {name} {dtype}: triton vs split rel err {rel:.3g}; triton not timed")
    gy = torch.randn(batch, n, ho, ho, device=DEVICE, dtype=dtype).to(memory_format=torch.channels_last)
    for cand, (fn, leaves) in candidates.items():
        if cand == "triton" and not gated:
            continue
        with torch.no_grad():
            row[f"{cand}_fwd_ms"] = TIMER(fn)

        def train(fn=fn, leaves=leaves):
            torch.autograd.grad(fn(), leaves, gy)

        row[f"{cand}_fwdbwd_ms"] = TIMER(train)
        if cand == "triton":  # the tile configuration (and forward variant) the autotuner kept
            for kernel_name, kernel in (("fwd", hetconv_fwd_kernel), ("dx", hetconv_dx_kernel), ("dw", hetconv_dw_kernel)):
                row[f"triton_{kernel_name}_config"] = str(kernel.best_config)
    macs = hetconv_macs(batch, m, n, ho, ho, k, p)
    dense_macs = batch * ho * ho * n * m * k * k
    row["hetconv_gflop_fwd"] = 2 * macs / 1e9
    row["dense_gflop_fwd"] = 2 * dense_macs / 1e9
    for mode, factor in (("fwd", 1), ("fwdbwd", 3)):
        for cand in candidates:
            t = row.get(f"{cand}_{mode}_ms")
            if t is None:
                continue
            flops = (2 * dense_macs if cand == "dense" else 2 * macs) * factor
            row[f"{cand}_{mode}_tflops"] = flops / (t * 1e-3) / 1e12
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/gpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--p", type=int, default=4)
    parser.add_argument("--dtypes", default="bfloat16,tf32")
    parser.add_argument("--grids", default="vgg16,resnet")
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--correctness-only", action="store_true")
    parser.add_argument("--forward-variant", choices=("auto", "taps", "flat"), default="auto",
                        help="the forward kernel's reduction loop: autotuned (default), or forced")
    parser.add_argument("--dw-variant", choices=("auto", "gather", "aligned"), default="auto",
                        help="the weight-gradient kernel's row tiles: autotuned (default), or forced")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU under TRITON_INTERPRET=1 (checks the script, times nothing useful)")
    parser.add_argument("--fp32-strict", action="store_true",
                        help="correctness of float32 with TF32 off (IEEE dots), first 3 configurations only")
    args = parser.parse_args()
    global DEVICE, TIMER
    DEVICE = pick_device(parser, args.smoke)
    TIMER = make_timer(DEVICE)
    if args.smoke:
        args.batch, args.grids = 2, "smoke"
    if args.forward_variant != "auto":
        conv_common.FORCED_VARIANT["FLAT"] = args.forward_variant == "flat"
    if args.dw_variant != "auto":
        conv_common.FORCED_VARIANT["ALIGNED"] = args.dw_variant == "aligned"
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    lines = []

    def log(text):
        print(text, flush=True)
        lines.append(text)

    gpu = machine_name(DEVICE)
    header = run_header(
        DEVICE, batch=args.batch, p=args.p, kernel_size=3, forward_variant=args.forward_variant,
        dw_variant=args.dw_variant, layout="blocked", memory_format="channels_last",
        **{"cudnn.benchmark": True, "allow_tf32": True},
    )
    log(json.dumps(header))
    correct = None  # not checked in this run (--skip-correctness)
    if args.fp32_strict:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = False
        t0 = time.time()
        correct = check_correctness(log, dtypes=(torch.float32,), limit=3)
        log(f"float32 strict section: {time.time() - t0:.1f} s")
        stem = os.path.join(args.out, f"{slug(gpu)}-hetconv-fp32-strict")
        write_atomic(stem + ".json", json.dumps({"header": header, "correct": correct}, indent=1))
        write_atomic(stem + ".md", "```\n" + "\n".join(lines) + "\n```\n")
        return 0 if correct else 1
    if not args.skip_correctness:
        t0 = time.time()
        correct = check_correctness(log, limit=1 if args.smoke else None)
        log(f"correctness section: {time.time() - t0:.1f} s")
        if args.correctness_only:
            return 0 if correct else 1
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = torch.float32 if dtype_name == "tf32" else getattr(torch, dtype_name)
        for grid in args.grids.split(","):
            for name, m, n, hw, stride in SHAPES[grid]:
                t0 = time.time()
                row = bench_shape(f"{grid}.{name}", m, n, hw, stride, dtype, args.p, args.batch, 3, log)
                row["dtype"] = dtype_name
                rows.append(row)
                log(json.dumps(row) + f"  [{time.time() - t0:.1f} s]")
                write_atomic(os.path.join(args.out, "partial.json"), json.dumps({"header": header, "rows": rows}, indent=1))

    table = ["| layer | M→N @HxW s | dtype | dense fwd ms | decomp fwd | split fwd | triton fwd | dense/triton fwd | decomp/triton fwd "
             "| dense fwd+bwd ms | decomp | split | triton | dense/triton f+b | triton TFLOP/s fwd (useful) | dense TFLOP/s fwd |",
             "|" + "---|" * 16]
    for r in rows:
        def ms(key):
            v = r.get(key)
            return f"{v:.3f}" if v is not None else "—"

        def ratio(a, b):
            return f"{r[a] / r[b]:.2f}x" if r.get(a) and r.get(b) else "—"

        table.append(
            f"| {r['layer']} | {r['M']}→{r['N']} @{r['H']} s{r['stride']} | {r['dtype']} | {ms('dense_fwd_ms')} | "
            f"{ms('decomp_fwd_ms')} | {ms('split_fwd_ms')} | {ms('triton_fwd_ms')} | {ratio('dense_fwd_ms', 'triton_fwd_ms')} | "
            f"{ratio('decomp_fwd_ms', 'triton_fwd_ms')} | {ms('dense_fwdbwd_ms')} | {ms('decomp_fwdbwd_ms')} | "
            f"{ms('split_fwdbwd_ms')} | {ms('triton_fwdbwd_ms')} | {ratio('dense_fwdbwd_ms', 'triton_fwdbwd_ms')} | "
            f"{r.get('triton_fwd_tflops', 0):.0f} | {r.get('dense_fwd_tflops', 0):.0f} |"
        )
    log("\n".join(table))
    variant = "".join(f"-{v}" for v in (args.forward_variant, args.dw_variant) if v != "auto")
    stem = os.path.join(args.out, f"{slug(gpu)}-hetconv-p{args.p}-b{args.batch}{variant}")
    write_atomic(stem + ".json", json.dumps({"header": header, "correct": correct, "rows": rows}, indent=1))
    write_atomic(stem + ".md", "```\n" + "\n".join(lines[:-1]) + "\n```\n\n" + "\n".join(table) + "\n")
    partial = os.path.join(args.out, "partial.json")
    if os.path.exists(partial):  # the progress file of this run, superseded
        os.remove(partial)
    log(f"wrote {stem}.json and {stem}.md")
    return 1 if correct is False else 0  # a failed correctness check fails the run (after writing it)


if __name__ == "__main__":
    sys.exit(main())
