"""The Triton depthwise kernels on a GPU: correctness, then speed against cuDNN.

The depthwise KxK convolution of DSConv2d (MobileNet, https://arxiv.org/abs/1704.04861)
and BSConv-U/S (https://arxiv.org/abs/2003.13549). One run:

1. correctness: small random configurations (depth multiplier 1-3, K = 1/3/5 and
   non-square, stride, padding, dilation, bias, NCHW and NHWC) in float32,
   bfloat16 and float16: output and every gradient of ``depthwise_triton``
   against a float64 ``F.conv2d``, under the tolerance policy of tests/helpers.py
   (error at most 2 x torch's own error in that dtype + atol);
2. speed: the depthwise 3x3 layers of MobileNet-v1 and MobileNet-v2 (ImageNet
   shapes) at batch 128, channels_last, bfloat16 and float32, forward and
   forward+backward (input and weight gradients): ``F.conv2d(groups=C)`` (cuDNN)
   against the ``triton`` kernels. Each triton run is gated: its forward output
   must match cuDNN's to 2e-2 relative (Frobenius) before it is timed.

Times are medians of ``triton.testing.do_bench`` (CUDA events). The layers are
memory-bound (K*K MACs per loaded element), so the table reports the forward's
effective bandwidth, (input + output + weight bytes) / time, beside the times.
``auto`` in DepthwiseConv2d keeps ``triton`` only where it measures faster on the
user's GPU; this table says where that is on the benchmark machine.

    python benchmarks/gpu_depthwise.py --out results/gpu   # writes <gpu>-depthwise-b128.{json,md}

``--smoke`` runs the whole script on tiny shapes on the CPU under
``TRITON_INTERPRET=1`` (a wall-clock timer instead of CUDA events); the test
suite uses it to keep the script working. Its timings mean nothing.
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

from leanconv.bench import markdown_table, write_atomic  # noqa: E402
from leanconv.ops.depthwise_triton import depthwise_triton  # noqa: E402

# (name, channels, H=W, stride) at K=3, padding=1
SHAPES = {
    "mobilenet_v1": [
        ("dw1", 32, 112, 1),
        ("dw2", 64, 112, 2),
        ("dw3", 128, 56, 1),
        ("dw5", 256, 28, 1),
        ("dw7", 512, 14, 1),
        ("dw12", 512, 14, 2),
        ("dw13", 1024, 7, 1),
    ],
    "mobilenet_v2": [
        ("b1", 96, 112, 2),
        ("b2", 144, 56, 1),
        ("b4", 192, 28, 1),
        ("b7", 384, 14, 1),
        ("b14", 960, 7, 1),
    ],
    "smoke": [("tiny", 8, 6, 1), ("tiny_s2", 8, 7, 2)],
}
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def torch_depthwise(x, weight, bias, stride, padding, dilation):
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups=x.shape[1])


# ----------------------------------------------------------------------------- correctness
def check_correctness(device, log) -> bool:
    torch.manual_seed(0)
    configs = [
        # B, C, D, H, W, (KH, KW), stride, padding, dilation, bias, channels_last
        (3, 16, 1, 9, 11, (3, 3), (1, 1), (1, 1), (1, 1), True, True),
        (2, 12, 2, 10, 7, (3, 5), (2, 1), (1, 2), (1, 1), True, False),
        (2, 32, 1, 8, 8, (5, 5), (2, 2), (2, 2), (2, 1), False, True),
        (1, 24, 3, 6, 9, (1, 1), (2, 2), (0, 0), (1, 1), True, True),
        (4, 64, 1, 14, 14, (3, 3), (2, 2), (1, 1), (1, 1), False, True),
    ]
    if device == "cpu":
        configs = configs[1:2]  # the smoke run: one config (multiplier 2, non-square kernel, stride)
    ok_all = True
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for cfg in configs:
            b, c, d, h, w, kernel, stride, padding, dilation, with_bias, channels_last = cfg
            x64 = torch.randn(b, c, h, w, device=device, dtype=torch.float64)
            w64 = torch.randn(c * d, 1, *kernel, device=device, dtype=torch.float64) / (kernel[0] * kernel[1]) ** 0.5
            b64 = torch.randn(c * d, device=device, dtype=torch.float64) if with_bias else None
            geometry = (stride, padding, dilation)

            def run(fn, dt):
                leaves = [t.to(dt).detach().requires_grad_() if t is not None else None for t in (x64, w64, b64)]
                xin = leaves[0].to(memory_format=torch.channels_last) if channels_last else leaves[0]
                y = fn(xin, leaves[1], leaves[2], *geometry)
                gy = torch.randn(y.shape, device=device, dtype=torch.float64, generator=torch.Generator(device).manual_seed(1))
                return [y, *torch.autograd.grad(y, [t for t in leaves if t is not None], gy.to(dt))]

            ref = run(torch_depthwise, torch.float64)
            base = run(torch_depthwise, dtype)
            fast = run(depthwise_triton, dtype)
            for name, f, t, r in zip(["y", "dx", "dw", "dbias"], fast, base, ref):
                fast_err = (f.double() - r).abs().max().item()
                bound = 2 * (t.double() - r).abs().max().item() + ATOL[dtype] * max(1.0, r.abs().max().item())
                good = bool(torch.isfinite(f).all()) and fast_err <= bound
                ok_all &= good
                if not good:
                    log(f"FAIL {dtype} {cfg} {name}: err {fast_err:.3g} > bound {bound:.3g}")
    log(f"correctness (output and all gradients, {len(configs)} configs x float32/bfloat16/float16): "
        f"{'PASS' if ok_all else 'FAIL'}")
    return ok_all


# ----------------------------------------------------------------------------- speed
def bench_shape(grid, name, channels, hw, stride, dtype, batch, device, timer, log):
    torch.manual_seed(0)
    x = torch.randn(batch, channels, hw, hw, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    weight = (torch.randn(channels, 1, 3, 3, device=device, dtype=dtype) / 3).requires_grad_()
    x.requires_grad_()
    geometry = ((stride, stride), (1, 1), (1, 1))
    candidates = {
        "cudnn": lambda: torch_depthwise(x, weight, None, *geometry),
        "triton": lambda: depthwise_triton(x, weight, None, *geometry),
    }
    with torch.no_grad():
        expected = candidates["cudnn"]().float()
        got = candidates["triton"]().float()
    rel = ((got - expected).norm() / expected.norm()).item()
    ho = expected.shape[2]
    row = {"layer": f"{grid}.{name}", "C": channels, "H": hw, "stride": stride, "dtype": str(dtype).replace("torch.", ""),
           "triton_vs_cudnn_rel_err": rel, "gate": rel < 2e-2}
    if not row["gate"]:
        log(f"GATE FAILED {row['layer']} {dtype}: triton vs cuDNN rel err {rel:.3g}; triton not timed")
    gy = torch.randn(batch, channels, ho, ho, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    element = x.element_size()
    forward_bytes = (x.numel() + gy.numel() + weight.numel()) * element
    for cand, fn in candidates.items():
        if cand == "triton" and not row["gate"]:
            continue
        with torch.no_grad():
            row[f"{cand}_fwd_ms"] = timer(fn)

        def train(fn=fn):
            torch.autograd.grad(fn(), [x, weight], gy)

        row[f"{cand}_fwdbwd_ms"] = timer(train)
        row[f"{cand}_fwd_GBps"] = forward_bytes / (row[f"{cand}_fwd_ms"] * 1e-3) / 1e9
    for mode in ("fwd", "fwdbwd"):
        if row.get(f"triton_{mode}_ms"):
            row[f"speedup_{mode}"] = row[f"cudnn_{mode}_ms"] / row[f"triton_{mode}_ms"]
    row["macs_fwd"] = batch * ho * ho * channels * 9
    return row


COLUMNS = ["layer", "C", "H", "stride", "dtype", "cudnn_fwd_ms", "triton_fwd_ms", "speedup_fwd",
           "cudnn_fwdbwd_ms", "triton_fwdbwd_ms", "speedup_fwdbwd", "cudnn_fwd_GBps", "triton_fwd_GBps"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/gpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--grids", default="mobilenet_v1,mobilenet_v2")
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU under TRITON_INTERPRET=1 (checks the script, times nothing useful)")
    args = parser.parse_args()
    device = pick_device(parser, args.smoke)
    if args.smoke:
        args.batch, args.grids = 2, "smoke"
    else:
        torch.backends.cudnn.benchmark = True
    lines = []

    def log(text):
        print(text, flush=True)
        lines.append(text)

    machine = machine_name(device)
    header = run_header(device, batch=args.batch, kernel_size=3, memory_format="channels_last")
    log(json.dumps(header))
    correct = None
    if not args.skip_correctness:
        t0 = time.time()
        correct = check_correctness(device, log)
        log(f"correctness section: {time.time() - t0:.1f} s")
    timer = make_timer(device)
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for grid in args.grids.split(","):
            for name, channels, hw, stride in SHAPES[grid]:
                row = bench_shape(grid, name, channels, hw, stride, dtype, args.batch, device, timer, log)
                rows.append(row)
                log(json.dumps(row))
    table = markdown_table(rows, COLUMNS)
    log(table)
    stem = os.path.join(args.out, f"{slug(machine)}-depthwise-b{args.batch}")
    write_atomic(stem + ".json", json.dumps({"header": header, "correct": correct, "rows": rows}, indent=1))
    write_atomic(stem + ".md", "```\n" + "\n".join(lines[:-1]) + "\n```\n\n" + table)
    log(f"wrote {stem}.json and {stem}.md")
    return 1 if correct is False else 0  # a failed correctness check fails the run (after writing it)


if __name__ == "__main__":
    sys.exit(main())
