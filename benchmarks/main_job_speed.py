#!/usr/bin/env python3
"""The main job's speed without its training: the networks ``make demo`` (``leanconv
compare``) trains, built fresh, timed as it times them: inference of a batch of 1 and a
training step (forward, cross-entropy, backward, SGD with momentum) on its batch, every
conv kind interleaved in rounds, in NCHW (what the main job runs) and channels-last; and the
peak memory of a training step.

    python benchmarks/main_job_speed.py --out-dir results/cpu

Speed-ups are standard / variant in the same memory format (medians of interleaved
rounds; the spread is the interquartile range over the median).
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F

from leanconv.bench import describe_environment, machine_slug, peak_allocated_bytes, time_interleaved, write_results
from leanconv.commands.compare import DEFAULTS
from leanconv.compare import DEFAULT_CONVS
from leanconv.models import create


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--convs", default=",".join(DEFAULT_CONVS), help="conv specs (default: the main job's)")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--formats", default="contiguous,channels_last")
    parser.add_argument("--out", default=None, help="result stem (default OUT_DIR/<machine>-main-job-speed)")
    parser.add_argument("--out-dir", default="results/cpu")
    args = parser.parse_args(argv)
    convs = [c for c in args.convs.split(",") if c]
    if "standard" not in convs:
        convs.insert(0, "standard")
    model_name, width, batch = DEFAULTS["model"], DEFAULTS["width"], DEFAULTS["batch_size"]
    header = describe_environment()
    rows = []
    for fmt in [f for f in args.formats.split(",") if f]:
        memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        generator = torch.Generator().manual_seed(0)
        x1 = torch.randn(1, 3, 32, 32, generator=generator).contiguous(memory_format=memory_format)
        xb = torch.randn(batch, 3, 32, 32, generator=generator).contiguous(memory_format=memory_format)
        y = torch.randint(0, 10, (batch,), generator=generator)
        infer, step = {}, {}
        for conv in convs:
            torch.manual_seed(0)
            model = create(model_name, conv=conv, num_classes=10, width=width).to(memory_format=memory_format)
            evaluated = copy.deepcopy(model).eval()
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

            def run_infer(m=evaluated):
                with torch.no_grad():
                    m(x1)

            def run_step(m=model, opt=optimizer):
                loss = F.cross_entropy(m(xb), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            infer[conv], step[conv] = run_infer, run_step
        latency = time_interleaved(infer, warmup=3, repeats=args.repeats, inner=5)
        steps = time_interleaved(step, warmup=2, repeats=args.repeats)
        peaks = {conv: peak_allocated_bytes(run) / 2**20 for conv, run in step.items()}  # as leanconv compare measures it
        for conv in convs:
            rows.append({
                "conv": conv, "format": fmt,
                "latency_b1_ms": 1e3 * latency[conv].median, "latency_spread": latency[conv].spread,
                "latency_speedup": latency["standard"].median / latency[conv].median,
                f"train_step_b{batch}_ms": 1e3 * steps[conv].median, "train_step_spread": steps[conv].spread,
                "train_step_speedup": steps["standard"].median / steps[conv].median,
                "peak_train_mib": peaks[conv], "peak_vs_standard": peaks[conv] / peaks["standard"],
            })
            print(rows[-1], file=sys.stderr, flush=True)
    out = args.out or f"{args.out_dir}/{machine_slug(header)}-main-job-speed"
    config = {"command": "python benchmarks/main_job_speed.py", "what": "main-job-speed", "model": model_name,
              "width": width, "batch": batch, "convs": convs, "repeats": args.repeats}
    notes = [f"{model_name} width {width} as `make demo` builds it (fresh weights: speed does not depend on them)",
             "speed-up = standard / variant, same memory format; > 1: the variant is faster",
             "peak_train_mib: peak memory allocated during one training step (the profiler's, as leanconv compare "
             "reports it); peak_vs_standard: over the standard network's, same format"]
    for path in write_results(out, header=header, config=config, rows=rows, columns=list(rows[0]),
                              title="The main job's networks: batch-1 latency and training step", notes=notes):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
