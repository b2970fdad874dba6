#!/usr/bin/env python3
"""The deterministic ``auto`` rule against ``auto`` with measuring on, whole models,
side by side in one run (issue 10: the default must be no slower than measuring).

For each model variant (VGG-16-CIFAR with HetConv P=4 and P=8 by default), mode
(inference; a training step: forward, loss, backward, SGD) and memory format,
two copies of the same model are timed in interleaved rounds: one run by the
rule, one run with ``leanconv.config.benchmarking()`` on (its choices are
measured during the warm-up and remembered). Before timing, both are gated
against each other (the same function, whatever backends run).

    python benchmarks/rule_vs_measured.py --out results/cpu/<machine>-rule-vs-measured-vgg16_cifar-b64
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import leanconv
from leanconv import config
from leanconv.bench import describe_environment, machine_slug, write_results


def step_runner(model: nn.Module, x: torch.Tensor, mode: str, measuring: bool):
    target = torch.randint(0, 10, (x.shape[0],))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6) if mode == "train" else None

    def run():
        with config.benchmarking(measuring):
            if mode == "infer":
                with torch.no_grad():
                    return model(x)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
            return loss

    return run


def backends_used(model: nn.Module) -> str:
    names = sorted({m.last_backend for m in model.modules() if isinstance(m, leanconv.HetConv2d) and m.last_backend})
    return ",".join(names)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg16_cifar")
    parser.add_argument("--p", default="4,8")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--modes", default="infer,train")
    parser.add_argument("--formats", default="channels_last,contiguous")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=None, help="result stem (default OUT_DIR/<machine>-rule-vs-measured-MODEL-bBATCH)")
    parser.add_argument("--out-dir", default="results/cpu", help="folder of the default stem (default results/cpu)")
    args = parser.parse_args(argv)
    header = describe_environment()
    out = args.out or f"{args.out_dir}/{machine_slug(header)}-rule-vs-measured-{args.model}-b{args.batch}"
    rows, failed = [], []
    for p in [int(v) for v in args.p.split(",")]:
        torch.manual_seed(0)
        base = leanconv.models.create(args.model, conv="hetconv", p=p)
        for fmt in args.formats.split(","):
            memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
            x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=memory_format)
            for mode in args.modes.split(","):
                models = {name: copy.deepcopy(base).to(memory_format=memory_format).train(mode == "train")
                          for name in ("rule", "measured")}
                with torch.no_grad():
                    for model in models.values():
                        model.eval()
                    with config.benchmarking(True):
                        measured_out = models["measured"](x)
                    gate = (models["rule"](x) - measured_out).abs().max().item() / max(1.0, measured_out.abs().max().item())
                    for model in models.values():
                        model.train(mode == "train")
                if gate > 1e-4:
                    failed.append(f"p={p} {fmt} {mode}: rule and measured differ by {gate:.3g}")
                    continue
                runners = {name: step_runner(model, x, mode, name == "measured") for name, model in models.items()}
                for run in runners.values():  # warm-up: the measured copy measures here
                    run(), run()
                samples = {name: [] for name in runners}
                for _ in range(args.repeats):
                    for name, run in runners.items():
                        start = time.perf_counter()
                        run()
                        samples[name].append(time.perf_counter() - start)
                ratios = sorted(r / m for r, m in zip(samples["rule"], samples["measured"]))
                rows.append({
                    "variant": f"hetconv_p{p}", "mode": mode, "format": fmt,
                    "rule_ms": statistics.median(samples["rule"]) * 1e3,
                    "measured_ms": statistics.median(samples["measured"]) * 1e3,
                    "rule_over_measured": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1],
                    "rule_backends": backends_used(models["rule"]), "measured_backends": backends_used(models["measured"]),
                })
                print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
                      flush=True)
    config_dump = {"command": "python benchmarks/rule_vs_measured.py " + " ".join(argv or sys.argv[1:]), **vars(args)}
    write_results(
        out, header=header, config=config_dump, rows=rows,
        columns=["variant", "mode", "format", "rule_ms", "measured_ms", "rule_over_measured", "ratio_min",
                 "ratio_max", "rule_backends", "measured_backends"],
        title=f"auto's rule vs auto with measuring, {args.model}, batch {args.batch}",
        notes=["ms per call: medians of interleaved rounds; rule_over_measured: median of per-round ratios "
               "(<= 1: the rule is as fast or faster)", "both copies gated equal before timing"],
    )
    for message in failed:
        print("GATE FAILED:", message, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
