#!/usr/bin/env python3
"""Small depthwise convolutions on the CPU: ``F.conv2d`` (what ``nn.Conv2d`` and
leanconv's depthwise ``torch`` backend run) against the same call with its weight
prepacked once for oneDNN (``leanconv.ops.onednn``, the
preparation the ``torch`` backend caches for small eager float32 calls), in both
memory formats. Evidence for ``PACKED_DEPTHWISE_MAX_OUTPUT`` in
``leanconv.ops.backends``.

For a contiguous input oneDNN answers in channels-last; the packed candidate
includes the copy back to the contiguous format (``nn.Conv2d`` keeps the input's
format), which is what limits it to small calls. 3x3, padding 1, stride 1,
float32, one thread; each pair interleaved in rounds of calls; outputs gated
equal (1e-5) before timing.

    python benchmarks/depthwise_small.py --out results/cpu/<machine>-depthwise-small
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from leanconv.bench import describe_environment, machine_slug, write_results
from leanconv.ops import onednn
from leanconv.ops.backends import PACKED_DEPTHWISE_MAX_OUTPUT

SHAPES = [(1, c, h) for c in (8, 16, 32, 64, 128, 256, 512) for h in (4, 8, 16, 32)] + [
    (b, c, 8) for b in (2, 4, 8) for c in (16, 32)] + [
    (64, 64, 32), (64, 128, 16), (64, 256, 8), (64, 512, 4), (16, 32, 56), (32, 96, 28)]


def candidates(batch: int, channels: int, size: int, channels_last: bool):
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(channels, 1, 3, 3), torch.randn(channels)
    packed = onednn.prepack(weight, (1, 1), (1, 1), (1, 1), channels, x.shape)

    def plain():
        return F.conv2d(x, weight, bias, 1, 1, 1, channels)

    def prepacked():
        out = onednn.conv2d(x, packed, bias, (1, 1), (1, 1), (1, 1), channels)
        return out if channels_last else out.contiguous()

    return plain, prepacked


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--quick", action="store_true", help="three shapes, three rounds (a smoke run)")
    parser.add_argument("--out", default=None, help="result stem (default OUT_DIR/<machine>-depthwise-small)")
    parser.add_argument("--out-dir", default="results/cpu")
    args = parser.parse_args(argv)
    if not torch.backends.mkldnn.is_available():
        print("oneDNN is not built into this torch: nothing to compare", file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    header = describe_environment()
    out = args.out or f"{args.out_dir}/{machine_slug(header)}-depthwise-small"
    shapes = SHAPES[:3] if args.quick else SHAPES
    rounds = 3 if args.quick else args.rounds
    rows = []
    with torch.inference_mode():
        for channels_last in (False, True):
            for batch, channels, size in shapes:
                plain, prepacked = candidates(batch, channels, size, channels_last)
                expected, got = plain(), prepacked()
                assert got.stride() == expected.stride()
                gate = (got - expected).abs().max().item()
                if gate > 1e-5:
                    print(f"GATE FAILED {batch}x{channels}x{size}: {gate:.3g}", file=sys.stderr)
                    return 1
                calls = max(5, int(3e5 / (batch * channels * size * size)))
                times = ([], [])
                for index, candidate in enumerate((plain, prepacked)):
                    for _ in range(calls):
                        candidate()
                for _ in range(rounds):
                    for index, candidate in enumerate((plain, prepacked)):
                        start = time.perf_counter()
                        for _ in range(calls):
                            candidate()
                        times[index].append((time.perf_counter() - start) / calls * 1e6)
                ratios = sorted(b / a for a, b in zip(*times))
                elements = batch * channels * size * size
                rows.append({
                    "format": "channels_last" if channels_last else "contiguous",
                    "input": f"{batch}x{channels}x{size}x{size}", "output_elements": elements,
                    "conv2d_us": statistics.median(times[0]), "prepacked_us": statistics.median(times[1]),
                    "ratio_median": statistics.median(ratios), "ratio_q1": ratios[len(ratios) // 4],
                    "ratio_q3": ratios[3 * len(ratios) // 4],
                    "prepacked_by_rule": elements <= PACKED_DEPTHWISE_MAX_OUTPUT,
                })
                row = rows[-1]
                print(f"{row['format']:13s} {row['input']:14s} F.conv2d {row['conv2d_us']:8.1f} us  prepacked "
                      f"{row['prepacked_us']:8.1f} us  ratio {row['ratio_median']:.2f}", flush=True)
    config = {"command": "python benchmarks/depthwise_small.py " + " ".join(argv or sys.argv[1:]), **vars(args),
              "threads": 1, "mode": "inference_mode", "kernel": "3x3, padding 1, stride 1, float32",
              "packed_depthwise_max_output": PACKED_DEPTHWISE_MAX_OUTPUT}
    write_results(
        out, header=header, config=config, rows=rows,
        columns=["format", "input", "output_elements", "conv2d_us", "prepacked_us", "ratio_median", "ratio_q1",
                 "ratio_q3", "prepacked_by_rule"],
        title="Small depthwise convolutions: F.conv2d against a oneDNN-prepacked weight, 1 thread",
        notes=["times: medians over interleaved rounds (us per call); ratio = prepacked / F.conv2d within a round "
               "(median and quartiles over rounds); prepacked_by_rule: output elements <= "
               f"{PACKED_DEPTHWISE_MAX_OUTPUT}, where leanconv's depthwise backend prepacks",
               "contiguous inputs: the prepacked time includes the copy of oneDNN's channels-last output back to "
               "the contiguous format"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
