"""Compare convolution kinds in one model: same data, recipe and seed for every
variant; accuracy, parameters, MACs and measured time side by side.

The claim under test (HetConv, https://arxiv.org/abs/1903.04120; BSConv,
https://arxiv.org/abs/2003.13549; MobileNets, https://arxiv.org/abs/1704.04861):
far fewer multiply-accumulates at about the same accuracy. For each conv spec
the model is trained with :func:`leanconv.train.train` (into
OUT/runs/<spec>-<recipe hash>/, so an interrupted comparison resumes each
variant where it stopped and reuses finished ones), evaluated on the test
split, and measured:

* ``params``; ``macs`` (exact count: what the layers compute) and
  ``macs_paper`` (the HetConv paper's reporting convention), per image, from
  :func:`leanconv.accounting.count`; MACs = multiply-accumulates, FLOPs = 2 x MACs;
* ``latency_ms``: inference of one batch of ``latency_batch`` images (eval mode;
  a sample is the mean of 5 calls); ``latency_optimized_ms``: the same through
  :func:`leanconv.optimize_for_inference` (BN folded, oneDNN with prepacked weights;
  CPU only), channels-last; with ``runtimes`` (``"openvino"``, ``"onnxruntime"``),
  ``latency_<runtime>_ms``: the model exported by :func:`leanconv.export.export_onnx`
  (to OUT/onnx/) in that runtime, in a process of its own
  (:mod:`leanconv.bench.runtimes`), medians of ``repeats`` blocks of calls;
* ``train_step_ms``: forward, backward and SGD step on one training batch;
* ``peak_train_mib``: peak memory allocated during one training step.

Times are medians of rounds in which every variant runs once in turn
(:func:`leanconv.bench.time_interleaved`), so all variants share the machine's
slow and fast moments; the interquartile spread is kept beside each median.
Training runs with HetConv's deterministic backend rule (see
:class:`leanconv.train.TrainConfig`); the timed steps use the library's default
``auto``, as a user's model would.

Example::

    rows = compare(["standard", "hetconv:p=4", "dsc"], TrainConfig(model="vgg16_cifar", width=0.25, epochs=2), "runs/cmp")
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .bench.environment import describe_environment
from .bench.memory import peak_allocated_bytes
from .bench.report import markdown_table
from .files import write_atomic
from .bench.timing import time_interleaved
from .data import load_dataset
from .layers import orthonormal_penalty
from .layers.protocol import regularizers
from .accounting import count
from .bench.runtimes import check_runtime_names, why_runtime_unavailable
from .inference import optimize_for_inference
from .conv_spec import parse_conv_spec
from .train import TrainConfig, autocast_context, load_trained_model, train
from .train.distributed import pick_device

__all__ = ["DEFAULT_CONVS", "COLUMNS", "compare", "variant_run_dir", "write_compare_results"]

DEFAULT_CONVS = ("standard", "hetconv:p=2", "hetconv:p=4", "dsc", "bsconv_u", "bsconv_s", "gwpw:g=4")

COLUMNS = ["conv", "params", "macs", "macs_paper", "mac_ratio", "top1", "top5", "test_loss", "latency_ms",
           "latency_spread", "latency_optimized_ms", "train_step_ms", "train_step_spread", "peak_train_mib",
           "train_seconds"]


def variant_run_dir(out: str, config: TrainConfig) -> str:
    """OUT/runs/<conv spec>-<hash of the recipe>: same recipe, same folder."""
    recipe = {k: v for k, v in config.to_dict().items() if k not in ("out", "progress", "workers", "device")}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:8]
    slug = "".join(c if c.isalnum() else "_" for c in config.conv)
    return os.path.join(out, "runs", f"{slug}-{digest}")


def _train_or_reuse(config: TrainConfig, train_data, test_data, log) -> dict:
    summary_path = os.path.join(config.out, "summary.json")
    checkpoint_path = os.path.join(config.out, "last.pt")
    if os.path.exists(summary_path) and os.path.exists(checkpoint_path):
        with open(summary_path) as handle:
            summary = json.load(handle)
        if summary.get("epochs") == config.epochs:
            log(f"  {config.conv}: reusing the finished run in {config.out}")
            return summary
    return train(config, resume=os.path.exists(checkpoint_path), train_data=train_data, test_data=test_data,
                 log=lambda line: log(f"  {line}"))


def _count_macs(model: torch.nn.Module) -> tuple[int, int]:
    """MACs per image (exact, paper) for the model's default input size."""
    size = tuple(getattr(model, "default_input_size", (3, 32, 32)))
    model = copy.deepcopy(model).cpu().eval()
    return tuple(int(count(model, size, convention=convention).macs) for convention in ("exact", "paper"))


@contextlib.contextmanager
def _quiet_native_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _measure(models: dict, device: torch.device, num_classes: int, batch_size: int, latency_batch: int,
             ortho_alpha: float, channels_last: bool, amp: str, repeats: int, warmup: int) -> dict:
    """Interleaved inference and training-step times and training peak memory."""
    generator = torch.Generator().manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    make_input = lambda n: torch.randn(n, 3, 32, 32, generator=generator).to(device).contiguous(memory_format=memory_format)  # noqa: E731
    x_latency, x_train = make_input(latency_batch), make_input(batch_size)
    y_train = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    inference, train_steps = {}, {}
    x_optimized = x_latency.contiguous(memory_format=torch.channels_last)
    for name, model in models.items():
        eval_model = model.to(device, memory_format=memory_format).eval()
        train_model = copy.deepcopy(eval_model).train()
        optimizer = torch.optim.SGD(train_model.parameters(), lr=1e-3, momentum=0.9)
        regularized = bool(regularizers(train_model))

        def infer(m=eval_model):
            with torch.no_grad(), autocast_context(amp, device):
                m(x_latency)
            sync()

        if device.type == "cpu" and amp == "off":
            def infer_optimized(m=optimize_for_inference(eval_model)):
                with torch.inference_mode():
                    m(x_optimized)

            inference[f"{name}|optimized"] = infer_optimized

        def step(m=train_model, opt=optimizer, penalty=regularized):
            with autocast_context(amp, device):
                loss = F.cross_entropy(m(x_train).float(), y_train)
            if penalty:
                loss = loss + orthonormal_penalty(m, ortho_alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync()

        inference[name], train_steps[name] = infer, step
    latency = time_interleaved(inference, warmup=warmup, repeats=repeats, inner=5)  # a sample: mean of 5 calls
    step_times = time_interleaved(train_steps, warmup=warmup, repeats=max(3, repeats // 2))
    with _quiet_native_stderr():  # the profiler behind peak_allocated_bytes logs its start and stop
        peaks = {name: peak_allocated_bytes(run, device.type) for name, run in train_steps.items()}
    return {name: (latency[name], latency.get(f"{name}|optimized"), step_times[name], peaks[name]) for name in models}


def _runtime_latencies(models: dict, runtimes: Sequence[str], out: str, latency_batch: int, repeats: int,
                       log: Callable[[str], None]) -> dict[tuple[str, str], float]:
    """(conv, runtime) -> median ms of the model exported to OUT/onnx/ in that runtime."""
    from .bench.runtimes import RuntimeJob, time_in_runtime
    from .export import export_onnx

    x = torch.randn(latency_batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    jobs = []
    os.makedirs(os.path.join(out, "onnx"), exist_ok=True)
    for conv, model in models.items():
        model = copy.deepcopy(model).cpu().float().eval()
        path = os.path.join(out, "onnx", conv.replace(":", "-").replace("=", "") + ".onnx")
        with _quiet_native_stderr():
            export_onnx(model, x, path)
        with torch.inference_mode():
            jobs.append(RuntimeJob(conv, path, x, model(x)))
    latencies = {}
    for runtime in runtimes:
        log(f"timing the exported graphs in {runtime} (a process of its own)")
        for conv, result in time_in_runtime(runtime, jobs, threads=torch.get_num_threads(), repeats=repeats).items():
            latencies[conv, runtime] = result.timing.median * 1e3
    return latencies


def compare(
    convs: Sequence[str],
    base: TrainConfig,
    out: str,
    *,
    latency_batch: int = 1,
    repeats: int = 15,
    warmup: int = 3,
    runtimes: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Train, evaluate and measure every conv spec; write OUT/results.* and plots; return the rows.

    ``convs``: conv spec strings (``"hetconv:p=4"``); each is checked complete
    before any training. ``base``: the recipe every variant shares (its
    ``conv``, ``p`` and ``out`` are replaced per variant). ``runtimes``: deployment
    runtimes (``"openvino"``, ``"onnxruntime"``) whose latency columns are added.
    """
    specs = [str(parse_conv_spec(conv, complete=True)) for conv in convs]
    if not specs:
        raise ValueError("convs must name at least one conv spec, got none")
    if len(set(specs)) != len(specs):
        raise ValueError(f"convs repeat a spec: {list(convs)}")
    if not (isinstance(latency_batch, int) and latency_batch >= 1):
        raise ValueError(f"latency_batch must be an integer >= 1, got {latency_batch!r}")
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    runtimes = check_runtime_names(runtimes)
    for runtime in runtimes:
        why = why_runtime_unavailable(runtime)
        if why:
            raise ValueError(f"runtimes: {why}")
    configs = {}
    for conv in specs:
        config = dataclasses.replace(base, conv=conv, p=None)
        configs[conv] = dataclasses.replace(config, out=variant_run_dir(out, config))
    start = time.perf_counter()
    train_data, test_data = load_dataset(base.data, "train"), load_dataset(base.data, "test")
    summaries, models = {}, {}
    for index, (conv, config) in enumerate(configs.items(), 1):
        log(f"[{index}/{len(specs)}] {conv}: training {config.epochs} epoch(s) -> {config.out}")
        summaries[conv] = _train_or_reuse(config, train_data, test_data, log)
        models[conv], _ = load_trained_model(os.path.join(config.out, "last.pt"))
    device = pick_device(base.device, 0)
    log(f"measuring inference (batch {latency_batch}) and training steps (batch {base.batch_size}), "
        f"interleaved over {len(models)} variants on {device}")
    measured = _measure(models, device, train_data.num_classes, base.batch_size, latency_batch, base.ortho_alpha,
                        base.channels_last, base.amp, repeats, warmup)
    runtime_ms = _runtime_latencies(models, runtimes, out, latency_batch, repeats, log) if runtimes else {}
    rows = []
    for conv in specs:
        latency, optimized, step, peak = measured[conv]
        macs, macs_paper = _count_macs(models[conv])
        final = summaries[conv]["final"]
        rows.append({
            "conv": conv,
            "params": sum(p.numel() for p in models[conv].parameters()),
            "macs": macs,
            "macs_paper": macs_paper,
            "top1": final["top1"],
            "top5": final["top5"],
            "test_loss": final["loss"],
            "latency_ms": latency.median * 1e3,
            "latency_spread": latency.spread,
            "latency_optimized_ms": None if optimized is None else optimized.median * 1e3,
            **{f"latency_{runtime}_ms": runtime_ms[conv, runtime] for runtime in runtimes},
            "train_step_ms": step.median * 1e3,
            "train_step_spread": step.spread,
            "peak_train_mib": peak / 2**20,
            "train_seconds": summaries[conv]["train_seconds"],
            "run_dir": configs[conv].out,
        })
    reference = next((r["macs"] for r in rows if r["conv"] == "standard" and r["macs"]), None)
    for row in rows:
        row["mac_ratio"] = row["macs"] / reference if reference and row["macs"] else None
    settings = {"convs": specs, "recipe": base.to_dict(), "latency_batch": latency_batch, "runtimes": runtimes,
                "train_step_batch": base.batch_size, "repeats": repeats, "warmup": warmup,
                "device": str(device), "seconds": time.perf_counter() - start}
    write_compare_results(out, rows, settings, log=log)
    return rows


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _plot(plt, rows: list[dict], x_key: str, y_key: str, x_label: str, y_label: str, title: str, path: str) -> None:
    points = [r for r in rows if r.get(x_key) is not None and r.get(y_key) is not None]
    figure, axes = plt.subplots(figsize=(7.2, 4.6))
    markers = "osD^v<>ph*"
    # Labels beside the points alternate above and below (neighbours in MACs often
    # sit close); the legend names every point too.
    for index, row in enumerate(sorted(points, key=lambda r: r[x_key])):
        x, y = row[x_key] / 1e6, row[y_key]
        axes.scatter(x, y, marker=markers[index % len(markers)], s=40, label=row["conv"])
        axes.annotate(row["conv"], (x, y), textcoords="offset points", xytext=(5, 6 if index % 2 == 0 else -12),
                      fontsize=8)
    axes.legend(fontsize=7, loc="best")
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    write_atomic(path, buffer.getvalue())


def write_compare_results(out: str, rows: list[dict], settings: dict, *, log: Callable[[str], None] = print) -> list[str]:
    """OUT/results.json (list of rows), results.csv, results.md, settings.json
    and, with matplotlib, accuracy_vs_macs.png and latency_vs_macs.png (without
    it the plots are skipped and ``log`` says so). Returns the paths written."""
    environment = describe_environment()
    paths = [os.path.join(out, name) for name in ("results.json", "results.csv", "results.md", "settings.json")]
    write_atomic(paths[0], json.dumps(rows, indent=1) + "\n")
    buffer = io.StringIO()
    columns = COLUMNS + [f"latency_{runtime}_ms" for runtime in settings.get("runtimes", ())]
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(paths[1], buffer.getvalue())
    recipe = settings["recipe"]
    text = (f"# leanconv compare: {recipe['model']} width {recipe['width']}, {recipe['epochs']} epoch(s) on "
            f"{recipe['data']}\n\n"
            + ", ".join(f"{k}={v}" for k, v in environment.items()) + "\n\n"
            f"- top1/top5: test accuracy (fractions) after the last epoch; same recipe and seed for every variant\n"
            f"- macs: multiply-accumulates per image, exact count; macs_paper: HetConv paper's reporting "
            f"convention; FLOPs = 2 x MACs; mac_ratio = macs / standard's\n"
            f"- latency_ms: inference of a batch of {settings['latency_batch']} (the model in eval mode); "
            f"latency_optimized_ms: the same through leanconv.optimize_for_inference, channels-last"
            + "".join(f"; latency_{r}_ms: the exported graph in {r}" for r in settings.get("runtimes", ()))
            + f"\n- train_step_ms: forward + backward + "
            f"SGD step on a batch of {settings['train_step_batch']}; medians of interleaved rounds on "
            f"{settings['device']}, *_spread = interquartile range / median\n"
            f"- peak_train_mib: peak memory allocated during one training step\n\n"
            + markdown_table(rows, columns))
    write_atomic(paths[2], text)
    write_atomic(paths[3], json.dumps({**settings, "environment": environment}, indent=1, default=str) + "\n")
    plt = _pyplot()
    if plt is None:
        log("plots skipped: matplotlib is not installed (pip install 'leanconv[plot]')")
        return paths
    model = f"{recipe['model']} w{recipe['width']}"
    for x, y, ylabel, name in (("macs", "top1", "test top-1 (fraction)", "accuracy_vs_macs.png"),
                               ("macs", "latency_ms", f"inference ms (batch {settings['latency_batch']})",
                                "latency_vs_macs.png")):
        path = os.path.join(out, name)
        _plot(plt, rows, x, y, "MMACs per image (exact; FLOPs = 2 x MACs)", ylabel, f"{model}: {ylabel} vs MACs",
              path)
        paths.append(path)
    return paths
