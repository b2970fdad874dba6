"""The direct separable kernels against the library forms of the same DSC, BSConv-U and
BSConv-S layers, on VGG-16's (CIFAR) layer shapes, CPU inference: the measurements behind
``leanconv.ops.separable_direct.pays`` (which calls the layers send to them).

Variants, timed interleaved per shape (``leanconv.bench.time_interleaved``, a sample the
mean of a block of calls of at least 30 ms):

* ``dense``: ``nn.Conv2d``'s convolution of the same shape (``F.conv2d``), the baseline of
  the MAC-ratio speed-up;
* ``library``: the ``F.conv2d`` calls of the layer (DSC: depthwise then 1x1; BSConv-U: 1x1
  then depthwise; BSConv-S: two 1x1s through its bottleneck, then depthwise);
* ``onednn``: the same convolutions through oneDNN with prepacked weights
  (``leanconv.ops.onednn``, what ``optimize_for_inference`` runs);
* ``direct``: the kernel (``leanconv.ops.separable_direct.run``).

Every variant is checked against the two convolutions before it is timed.

Example (the committed run)::

    .venv/bin/python benchmarks/separable_direct.py --threads 2

Writes JSON, CSV and Markdown results (machine header with the CPU capability and the
kernel's ISA) to ``results/cpu/``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

SHAPES = [(32, 32), (64, 32), (128, 16), (256, 8), (512, 4), (512, 2)]  # (channels, map side) of VGG-16 CIFAR
BATCHES = [1, 2, 4, 8, 16, 64]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=BATCHES)
    parser.add_argument("--formats", nargs="+", default=["channels_last", "contiguous"],
                        choices=["channels_last", "contiguous"])
    parser.add_argument("--kinds", nargs="+", default=["dsc", "bsconv_u", "bsconv_s"],
                        choices=["dsc", "bsconv_u", "bsconv_s"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="two small shapes, batch 1 and 4 (a smoke run)")
    parser.add_argument("--out", default=None, help="result path stem (default: results/cpu/<machine>-separable-direct)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from leanconv.bench import describe_environment, machine_slug, time_interleaved, write_results
    from leanconv.bench.timing import calls_lasting
    from leanconv.layers import bsconv_s_mid_channels
    from leanconv.ops import hetconv_direct, onednn, separable_direct

    if not hetconv_direct.available():
        print(f"the direct kernels are unavailable: {hetconv_direct.unavailable_reason()}", file=sys.stderr)
        return 1
    shapes = SHAPES[:2] if args.quick else SHAPES
    batches = [1, 4] if args.quick else args.batch
    repeats = 2 if args.quick else args.repeats
    rows = []
    for (channels, side), kind in [(shape, kind) for shape in shapes for kind in args.kinds]:
        pointwise_first = kind != "dsc"
        generator = torch.Generator().manual_seed(0)
        dw = torch.randn(channels, 1, 3, 3, generator=generator)
        dw_bias = torch.randn(channels, generator=generator)
        inputs = channels
        first = None
        if kind == "bsconv_s":  # pw1 into the bottleneck (BSConv-S's default p = 1/4), pw2 out of it
            inputs = bsconv_s_mid_channels(channels)
            first = (torch.randn(inputs, channels, 1, 1, generator=generator) / channels ** 0.5, None)
        pw = torch.randn(channels, inputs, 1, 1, generator=generator) / inputs ** 0.5
        pw_bias = None if pointwise_first else torch.randn(channels, generator=generator)
        dense = torch.randn(channels, channels, 3, 3, generator=generator)
        packed = separable_direct.pack(dw, dw_bias, pw, pw_bias, pointwise_first=pointwise_first, first_pointwise=first)
        for fmt in args.formats:
            memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
            for batch in batches:
                x = torch.randn(batch, channels, side, side, generator=generator).contiguous(memory_format=memory_format)
                packed_dw = onednn.prepack(dw, (1, 1), (1, 1), (1, 1), channels, x.shape)
                packed_pw = onednn.prepack(pw, (0, 0), (1, 1), (1, 1), 1, (batch, inputs, side, side))
                packed_first = None if first is None else onednn.prepack(first[0], (0, 0), (1, 1), (1, 1), 1, x.shape)

                def onednn_form(x=x, packed_dw=packed_dw, packed_pw=packed_pw, packed_first=packed_first):
                    if packed_first is not None:
                        x = onednn.conv2d(x, packed_first, None, (0, 0), (1, 1), (1, 1), 1)
                    if pointwise_first:
                        mid = onednn.conv2d(x, packed_pw, pw_bias, (0, 0), (1, 1), (1, 1), 1)
                        out = onednn.conv2d(mid, packed_dw, dw_bias, (1, 1), (1, 1), (1, 1), channels)
                    else:
                        mid = onednn.conv2d(x, packed_dw, dw_bias, (1, 1), (1, 1), (1, 1), channels)
                        out = onednn.conv2d(mid, packed_pw, pw_bias, (0, 0), (1, 1), (1, 1), 1)
                    return out if fmt == "channels_last" else out.contiguous()

                variants = {
                    "dense": lambda x=x: F.conv2d(x, dense, dw_bias, 1, 1),
                    "library": lambda x=x: separable_direct.reference(x, dw, dw_bias, pw, pw_bias, (1, 1), (1, 1), (1, 1),
                                                                      pointwise_first=pointwise_first,
                                                                      first_pointwise=first),
                    "onednn": onednn_form,
                    "direct": lambda x=x: separable_direct.run(x, packed, (3, 3), (1, 1), (1, 1), (1, 1)),
                }
                with torch.inference_mode():
                    expected = variants["library"]()
                    for name in ("onednn", "direct"):
                        out = variants[name]()
                        error = (out - expected).abs().max().item()
                        if not error <= 1e-4 * expected.abs().max().item() + 1e-5:
                            print(f"correctness gate failed: {name} {channels}x{side} b{batch} {fmt}: {error:.3g}",
                                  file=sys.stderr)
                            return 1
                    counts = {name: calls_lasting(run, 0.03) for name, run in variants.items()}
                    timed = time_interleaved(variants, warmup=1, repeats=repeats, inner=counts)
                ms = {name: 1e3 * timed[name].median for name in variants}
                macs_dense = batch * side * side * channels * channels * 9
                macs_dsc = batch * side * side * (channels * (9 + inputs) + (channels * inputs if first else 0))
                best_library = min(ms["library"], ms["onednn"])
                row = {"kind": kind, "channels": channels, "map": f"{side}x{side}", "batch": batch, "format": fmt,
                       **{f"{name}_ms": value for name, value in ms.items()},
                       "direct_over_best_library": ms["direct"] / best_library,
                       "direct_speedup_vs_dense": ms["dense"] / ms["direct"],
                       "mac_ratio": macs_dense / macs_dsc,
                       "fraction_of_mac_ratio": ms["dense"] / ms["direct"] / (macs_dense / macs_dsc),
                       "direct_gmacs": macs_dsc / (ms["direct"] * 1e6),
                       "rule_picks_direct": separable_direct.pays(batch, side, side, fmt == "channels_last"),
                       "iqr_pct_direct": 100 * timed["direct"].spread}
                rows.append(row)
                print(f"{kind:<8} {channels:>3}ch {side:>2}x{side:<2} b{batch:<3} {fmt:<13} " + "  ".join(
                    f"{name} {value:7.3f}" for name, value in ms.items())
                      + f"  direct/best library {row['direct_over_best_library']:.2f}", flush=True)

    header = describe_environment()
    title = (f"Direct separable kernels vs the library forms, VGG-16 CIFAR DSC, BSConv-U and BSConv-S layers (3x3), "
             f"inference, "
             f"CPU {header['cpu_capability']} (kernel ISA {header['hetconv_direct_isa']})")
    stem = args.out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "cpu",
                                    f"{machine_slug(header)}-separable-direct")
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    columns = ["kind", "channels", "map", "batch", "format", "dense_ms", "library_ms", "onednn_ms", "direct_ms",
               "direct_over_best_library", "direct_speedup_vs_dense", "mac_ratio", "fraction_of_mac_ratio",
               "direct_gmacs", "rule_picks_direct", "iqr_pct_direct"]
    notes = ["times per call (ms): medians over interleaved rounds, each sample a block of consecutive calls (>= 30 ms)",
             "direct_over_best_library < 1: the kernel is faster than the faster of the two library forms",
             "mac_ratio: nn.Conv2d's MACs over the DSC layer's; fraction_of_mac_ratio: the kernel's speed-up over "
             "dense divided by it; direct_gmacs: the layer's MACs (not FLOPs) per second",
             "rule_picks_direct: leanconv.ops.separable_direct.pays (at most 2048 output pixels; batch <= 2 channels-last, "
             "batch 1 NCHW)"]
    config = dict(vars(args), command="python " + " ".join(["benchmarks/separable_direct.py", *sys.argv[1:]]),
                  shapes=shapes, batches=batches, repeats=repeats)
    for path in write_results(stem, header=header, config=config, rows=rows, columns=columns, title=title, notes=notes):
        print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
