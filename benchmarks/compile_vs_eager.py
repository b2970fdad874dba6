"""A converted zoo model in eager mode against the same model under ``torch.compile``
(inductor, with freezing), CPU inference: does compiling keep leanconv's speed?

Variants, timed interleaved in one run (``leanconv.bench.time_interleaved``), each round
running a block of consecutive calls of each (at least 50 ms; a single eager call right after
a compiled one was measured 3-4x slower than eager alone):

* ``eager``: ``leanconv.fuse(model)`` in channels-last, ``inference_mode``;
* ``compiled``: the same fused model through ``torch.compile`` (inductor, with
  ``torch._inductor.config.freezing = True``, so that packing the ``direct``
  kernel's weights, ``torch.ops.leanconv.hetconv_direct_pack``, is folded into
  constants), ``no_grad``.

Correctness gate: the compiled output matches eager's (max |diff| <= 1e-4 * max |y|
+ 1e-5) before anything is timed. Compile time is reported, not timed.

Example::

    .venv/bin/python benchmarks/compile_vs_eager.py --model vgg16_cifar --conv hetconv:p=4 --batch 1 64

Writes JSON, CSV and Markdown results (machine header with the CPU capability,
resolved configuration, per-variant times) to ``results/cpu/``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn

from leanconv.bench.models import trained_looking_batchnorm


BLOCK_SECONDS = 0.05


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vgg16_cifar")
    parser.add_argument("--conv", nargs="+", default=["standard", "hetconv:p=4"], help="conv specs (leanconv's syntax)")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--size", type=int, default=None, help="input side (default: 32 for CIFAR models, else 224)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="result path stem (default: results/cpu/<machine>-compile-<model>)")
    return parser.parse_args(argv)


def build(name: str, width: float, spec: str) -> nn.Module:
    from leanconv import models
    from leanconv.conv_spec import parse_conv_spec
    from leanconv.conversion import convert
    from leanconv.fuse import fuse

    model = models.create(name, width=width)
    parsed = parse_conv_spec(spec)
    if parsed.kind != "standard":
        model = convert(model, parsed.kind, **dict(parsed.options))
    trained_looking_batchnorm(model)
    return fuse(model.eval()).to(memory_format=torch.channels_last)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import torch._inductor.config as inductor_config

    from leanconv.bench import describe_environment, machine_slug, time_interleaved, write_results
    from leanconv.bench.timing import calls_lasting

    inductor_config.freezing = True
    torch.manual_seed(0)
    size = args.size or (32 if "cifar" in args.model else 224)
    rows = []
    for spec in args.conv:
        model = build(args.model, args.width, spec)
        for batch in args.batch:
            x = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
            torch._dynamo.reset()
            compiled = torch.compile(model)
            with torch.no_grad():
                started = time.perf_counter()
                out = compiled(x)
                compile_s = time.perf_counter() - started
                with torch.inference_mode():
                    reference = model(x)
                error = (out - reference).abs().max().item()
                tolerance = 1e-4 * reference.abs().max().item() + 1e-5
                if not error <= tolerance:
                    print(f"correctness gate failed for {spec} batch {batch}: {error:.3g} > {tolerance:.3g}", file=sys.stderr)
                    return 1

                def eager():
                    with torch.inference_mode():
                        model(x)

                def compiled_run():
                    compiled(x)

                # Blocks of consecutive calls of at least BLOCK_SECONDS each: one eager call right after
                # one compiled call ran 3-4x slower than eager alone (VGG-16 at batch 1: 11 ms against
                # 2.7), which no user who runs one of the two sees.
                eager()
                inner = calls_lasting(eager, BLOCK_SECONDS)
                timings = time_interleaved({"eager": eager, "compiled": compiled_run}, warmup=args.warmup,
                                           repeats=args.repeats, inner=inner)
            e, c = timings["eager"], timings["compiled"]
            rows.append({"conv": spec, "batch": batch, "eager_ms": 1e3 * e.median, "eager_q1_ms": 1e3 * e.q1,
                         "eager_q3_ms": 1e3 * e.q3, "compiled_ms": 1e3 * c.median, "compiled_q1_ms": 1e3 * c.q1,
                         "compiled_q3_ms": 1e3 * c.q3, "compiled_over_eager": c.median / e.median,
                         "compile_s": compile_s, "max_abs_diff": error, "calls_per_block": inner})
            print(f"{spec:<14} batch {batch:>3}: eager {1e3 * e.median:8.2f} ms  compiled {1e3 * c.median:8.2f} ms  "
                  f"compiled/eager {c.median / e.median:5.2f}  (compile {compile_s:.0f} s)", flush=True)

    header = describe_environment()
    header["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    config = dict(vars(args), size=size, inductor_freezing=True, memory_format="channels_last")
    title = (f"torch.compile (inductor, freezing) vs eager: {args.model} width {args.width:g} {size}x{size}, "
             f"fused, channels-last, inference, CPU {header['cpu_capability']}")
    stem = args.out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "cpu",
                                    f"{machine_slug(header)}-compile-{args.model}-w{args.width:g}")
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    columns = ["conv", "batch", "eager_ms", "eager_q1_ms", "eager_q3_ms", "compiled_ms", "compiled_q1_ms",
               "compiled_q3_ms", "compiled_over_eager", "compile_s", "max_abs_diff", "calls_per_block"]
    notes = ["times per forward pass of the whole batch: medians over interleaved rounds, in each round a block of "
             "calls_per_block consecutive calls of each variant (at least 50 ms), quartiles beside; "
             "compiled_over_eager < 1 means compiling is faster"]
    for path in write_results(stem, header=header, config=config, rows=rows, columns=columns, title=title, notes=notes):
        print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
