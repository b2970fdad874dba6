"""Whole-network CPU inference, every path a user can take, on the same networks:

* ``fused``: ``leanconv.fuse(model)``, eager PyTorch, channels-last, ``inference_mode``;
* ``optimized``: ``leanconv.optimize_for_inference(model)``, the same way;
* ``compiled`` (``--compiled``): the fused model through ``torch.compile`` (inductor,
  ``freezing=True``), ``no_grad``;
* ``openvino`` and ``onnxruntime``: the fused model exported by
  ``leanconv.export.export_onnx`` (dynamic batch), f32, each runtime in a process of its own
  (``leanconv.bench.runtimes``), where installed.

Every variant is checked against the unfused model's output before it is timed. Rounds
alternate: each round times the PyTorch variants interleaved in this process, then
each runtime's process; a sample is the mean of a block of consecutive calls (at least
50 ms); medians over all rounds' samples, quartiles beside.

Example (the committed run)::

    .venv/bin/python benchmarks/inference_paths.py --threads 2

Writes JSON, CSV and Markdown (machine header with the CPU capability) to ``results/cpu/``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time

import torch

NETWORKS = {"vgg16_cifar": 32, "resnet18": 224}
BATCHES = {"vgg16_cifar": [1, 64], "resnet18": [1, 16]}
CONVS = ["standard", "hetconv:p=4", "hetconv:p=8", "bsconv_u", "dsc"]
BLOCK_SECONDS = 0.05


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--conv", nargs="+", default=CONVS, help="conv specs (leanconv's syntax)")
    parser.add_argument("--batch", type=int, nargs="+", default=None,
                        help="batch sizes (default: 1 and 64 for VGG-16, 1 and 16 for ResNet-18)")
    parser.add_argument("--runtimes", default="openvino,onnxruntime",
                        help="comma-separated deployment runtimes to time beside PyTorch ('' for none)")
    parser.add_argument("--compiled", action="store_true", help="also time torch.compile (inductor, freezing)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="samples per variant per round")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="result path stem (default: results/cpu/<machine>-inference-paths)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run: ResNet-20-shaped VGG at width 0.125, 1 round")
    return parser.parse_args(argv)


def build(network: str, spec: str, width: float) -> torch.nn.Module:
    from leanconv import models
    from leanconv.bench.models import trained_looking_batchnorm
    from leanconv.conversion import convert

    torch.manual_seed(0)
    model = models.create(network, width=width) if width != 1 else models.create(network)
    if spec != "standard":
        model = convert(model, spec)
    return trained_looking_batchnorm(model).eval()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import leanconv
    from leanconv.bench import describe_environment, machine_slug, time_interleaved, write_results
    from leanconv.bench.runtimes import RuntimeJob, check_runtime_names, time_in_runtime, why_runtime_unavailable
    from leanconv.bench.timing import Timing, calls_lasting
    from leanconv.export import export_onnx

    runtimes, skipped = [], {}
    for name in check_runtime_names(args.runtimes):
        why = why_runtime_unavailable(name)
        if why:
            skipped[name] = why
            print(f"# {why}: its column is left out", flush=True)
        else:
            runtimes.append(name)
    width = 0.125 if args.smoke else 1.0
    networks = ["vgg16_cifar"] if args.smoke else args.networks
    convs = args.conv[:2] if args.smoke else args.conv
    rounds, repeats = (1, 2) if args.smoke else (args.rounds, args.repeats)
    threads = torch.get_num_threads()
    if args.compiled:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True

    folder = tempfile.mkdtemp(prefix="leanconv-inference-paths-")
    cases = []  # (network, batch, spec, variants {name: callable}, x, expected, macs, onnx path)
    for network in networks:
        size = NETWORKS[network]
        for spec in convs:
            model = build(network, spec, width)
            fused = leanconv.fuse(model).to(memory_format=torch.channels_last)
            optimized = leanconv.optimize_for_inference(model)
            macs = leanconv.count(fused, (3, size, size)).macs
            onnx_path = None
            if runtimes:
                onnx_path = os.path.join(folder, f"{network}-{spec.replace(':', '-').replace('=', '')}.onnx")
                export_onnx(model, None, onnx_path, input_size=(2, 3, size, size))
            for batch in (args.batch or ([1, 4] if args.smoke else BATCHES[network])):
                x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
                x_cl = x.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode():
                    expected = model(x)
                variants = {"fused": fused, "optimized": optimized}
                if args.compiled:
                    compiled = torch.compile(fused)
                    started = time.perf_counter()
                    with torch.no_grad():
                        compiled(x_cl)
                    print(f"# compiled {network} {spec} batch {batch} in {time.perf_counter() - started:.0f} s", flush=True)
                    variants["compiled"] = compiled
                for name, run in variants.items():
                    with torch.no_grad() if name == "compiled" else torch.inference_mode():
                        out = run(x_cl)
                    error = (out - expected).abs().max().item()
                    tolerance = 1e-4 * expected.abs().max().item() + 1e-5
                    if not error <= tolerance:
                        print(f"correctness gate failed: {name} {network} {spec} batch {batch}: "
                              f"{error:.3g} > {tolerance:.3g}", file=sys.stderr)
                        return 1
                cases.append((network, batch, spec, variants, x, x_cl, expected, macs, onnx_path))
            print(f"# built {network} {spec}", flush=True)

    # A sample: a block of consecutive calls lasting at least BLOCK_SECONDS.
    candidates = {}
    counts = {}
    for network, batch, spec, variants, x, x_cl, expected, macs, onnx_path in cases:
        for name, run in variants.items():
            key = f"{network}|{batch}|{spec}|{name}"
            candidates[key] = functools.partial(run, x_cl)
            with torch.no_grad():
                counts[key] = calls_lasting(candidates[key], BLOCK_SECONDS)

    def pytorch_round(warmup):
        with torch.inference_mode():
            eager = {k: v for k, v in candidates.items() if not k.endswith("|compiled")}
            timed = time_interleaved(eager, warmup=warmup, repeats=repeats, inner=counts)
        compiled = {k: v for k, v in candidates.items() if k.endswith("|compiled")}
        if compiled:
            with torch.no_grad():
                timed.update(time_interleaved(compiled, warmup=warmup, repeats=repeats, inner=counts))
        return {k: list(t.rounds) for k, t in timed.items()}

    samples: dict[str, list[float]] = {}
    versions, load_s = {}, {}
    for index in range(rounds):
        for key, values in pytorch_round(warmup=2 if index == 0 else 1).items():
            samples.setdefault(key, []).extend(values)
        for runtime in runtimes:
            jobs = [RuntimeJob(f"{network}|{batch}|{spec}|{runtime}", onnx_path, x, expected)
                    for network, batch, spec, variants, x, x_cl, expected, macs, onnx_path in cases]
            for key, result in time_in_runtime(runtime, jobs, threads=threads, repeats=repeats,
                                               block_seconds=BLOCK_SECONDS).items():
                samples.setdefault(key, []).extend(result.timing.rounds)
                versions[runtime] = result.version
                load_s[key] = result.load_s
        print(f"# round {index + 1} of {rounds} done", flush=True)

    timings = {key: Timing.from_samples(values) for key, values in samples.items()}
    paths = ["fused", "optimized"] + (["compiled"] if args.compiled else []) + runtimes
    rows = []
    for network, batch, spec, variants, x, x_cl, expected, macs, onnx_path in cases:
        row = {"network": network, "batch": batch, "conv": spec, "gmacs_per_image": macs / 1e9}
        for path in paths:
            timing = timings[f"{network}|{batch}|{spec}|{path}"]
            row[f"{path}_ms"] = 1e3 * timing.median
            row[f"{path}_iqr_pct"] = 100 * timing.spread
        standard = timings.get(f"{network}|{batch}|standard|optimized")
        if standard is not None:
            row["optimized_speedup_vs_standard"] = standard.median / timings[f"{network}|{batch}|{spec}|optimized"].median
        for runtime in runtimes:
            row[f"optimized_over_{runtime}"] = row["optimized_ms"] / row[f"{runtime}_ms"]
        row["fastest"] = min(paths, key=lambda p: row[f"{p}_ms"])
        rows.append(row)
        print("  ".join([f"{network:<12} b{batch:<3} {spec:<12}"] + [f"{p} {row[f'{p}_ms']:8.2f}" for p in paths]
                        + [f"fastest {row['fastest']}"]), flush=True)

    header = describe_environment()
    header["runtime_versions"] = versions
    header["runtimes_left_out"] = skipped
    config = dict(vars(args), command="python " + " ".join(["benchmarks/inference_paths.py", *sys.argv[1:]]),
                  width=width, rounds=rounds, repeats=repeats, threads=threads,
                  block_seconds=BLOCK_SECONDS, memory_format="channels_last", onnx="leanconv.export.export_onnx, fused, "
                  "dynamic batch, opset default")
    title = (f"Whole-network CPU inference paths ({header['cpu_capability']}, {threads} threads): "
             f"leanconv in PyTorch vs deployment runtimes on the same graphs")
    stem = args.out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "cpu",
                                    f"{machine_slug(header)}-inference-paths" + ("-smoke" if args.smoke else ""))
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    columns = ["network", "batch", "conv", "gmacs_per_image"]
    for path in paths:
        columns += [f"{path}_ms", f"{path}_iqr_pct"]
    columns += (["optimized_speedup_vs_standard"] + [f"optimized_over_{r}" for r in runtimes] + ["fastest"])
    notes = [
        "times per forward pass of the whole batch (ms): medians over all rounds' samples, each the mean of a "
        "block of consecutive calls (>= 50 ms); *_iqr_pct: interquartile range over the median",
        "optimized_over_<runtime>: leanconv.optimize_for_inference's time over the runtime's on the same graph "
        "(< 1: leanconv's PyTorch path is faster)",
        "optimized_speedup_vs_standard: the standard network's optimized time over this row's (both through "
        "optimize_for_inference)",
        "gmacs_per_image: leanconv.count's exact convention (MACs, not FLOPs), per image",
    ]
    if load_s:
        notes.append("runtime load (compile) seconds per graph: " + ", ".join(f"{k}: {v:.1f}" for k, v in load_s.items()))
    for path in write_results(stem, header=header, config=config, rows=rows, columns=columns, title=title, notes=notes):
        print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
