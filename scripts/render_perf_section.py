#!/usr/bin/env python3
"""Render the README's performance section from committed result files.

Reads every ``*.json`` written by ``leanconv bench`` (or ``benchmarks/*.py``)
under ``--results`` (default ``results/cpu``) and writes Markdown to ``--out``
(default ``docs/performance.md``). Every number in the output comes from those
files; nothing is typed in by hand.

    python scripts/render_perf_section.py
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections import defaultdict

from leanconv.bench.timing import per_round_ratio
from leanconv.files import write_atomic


def fmt(value, digits=2):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def header_line(env: dict) -> str:
    load = env.get("load_average_1_5_15min")
    return (
        f"{env.get('cpu')} ({env.get('logical_cpus')} logical CPUs, {env.get('torch_threads')} torch threads, "
        f"{env.get('cpu_capability')}), torch {env.get('torch')}, {env.get('date_utc')}, "
        f"load average (1/5/15 min) {load}, commit {env.get('git_commit')}"
    )


def render_models(payload: dict, name: str) -> list[str]:
    rows = [r for r in payload["rows"] if "median_ms" in r]
    out = [f"### {payload['title']}", "", f"`{name}` -- {header_line(payload['environment'])}", ""]
    out += [
        "| variant | mode | memory format | median ms (min-max) | speed-up vs standard, same format | "
        "vs fastest standard | MAC ratio speed-up | peak step MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['model_variant']} | {r['mode']} | {r['format']} | {fmt(r['median_ms'], 1)} "
            f"({fmt(r['min_ms'], 1)}-{fmt(r['max_ms'], 1)}) | {fmt(r.get('speedup_vs_standard_same_format'))}x | "
            f"{fmt(r.get('speedup_vs_best_standard'))}x | {fmt(r.get('mac_speedup'))}x | {fmt(r.get('peak_step_mib'), 0)} |"
        )
    out.append("")
    return out


def render_layers(payload: dict, name: str) -> list[str]:
    rows = [r for r in payload["rows"] if "median_ms" in r]
    by_key = defaultdict(dict)
    for r in rows:
        by_key[(r["config"], r["mode"], r["format"])][r["candidate"]] = r
    out = [f"### {payload['title']}", "", f"`{name}` -- {header_line(payload['environment'])}", ""]
    out += [
        "Speed-up over `nn.Conv2d` of the same shape (median of interleaved runs); "
        "'of MAC ratio' = speed-up / (dense MACs / HetConv MACs).",
        "",
        "| layer | mode | format | auto ran | auto | of MAC ratio | masked | fused | packed | split | seed form | auto vs seed | auto vs public loop |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    worst = None
    for (config, mode, fmt_), c in by_key.items():
        auto = c.get("hetconv:auto")
        if auto is None:
            continue
        speed = lambda k: c[k]["speedup_vs_conv2d"] if k in c else None  # noqa: E731
        vs = lambda k: c[k]["median_ms"] / auto["median_ms"] if k in c else None  # noqa: E731
        out.append(
            f"| {config} | {mode} | {fmt_} | {auto.get('ran')} | {fmt(speed('hetconv:auto'))}x | "
            f"{fmt(auto.get('fraction_of_mac_ratio'))} | {fmt(speed('hetconv:masked'))}x | {fmt(speed('hetconv:fused'))}x | {fmt(speed('hetconv:packed'))}x | "
            f"{fmt(speed('hetconv:split'))}x | {fmt(speed('seed'))}x | {fmt(vs('seed'))}x | {fmt(vs('public_loop'), 1)}x |"
        )
        s = auto["speedup_vs_conv2d"]
        if worst is None or s < worst[0]:
            worst = (s, config, mode, fmt_)
    out.append("")
    if worst:
        out.append(f"Slowest `auto` layer relative to `nn.Conv2d`: {fmt(worst[0])}x at {worst[1]} ({worst[2]}, {worst[3]}).")
        out.append("")
    return out


def render_separable(payload: dict, name: str) -> list[str]:
    rows = [r for r in payload["rows"] if "median_ms" in r]
    out = [f"### {payload['title']}", "", f"`{name}` -- {header_line(payload['environment'])}", ""]
    out += ["| layer | mode | format | layer kind | median ms | speed-up vs nn.Conv2d | MAC ratio speed-up |",
            "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r['config'].rsplit('-P', 1)[0]} | {r['mode']} | {r['format']} | {r['candidate']} | {fmt(r['median_ms'])} | "
            f"{fmt(r.get('speedup_vs_conv2d'))}x | {fmt(1 / r['mac_ratio'])}x |"
        )
    out.append("")
    return out


def render_forms(payload: dict, name: str) -> list[str]:
    rows = payload["rows"]
    forms = list(dict.fromkeys(r["form"] for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    table = {(r["config"], r["form"]): r for r in rows}
    out = [f"### {payload['title']}", "", f"`{name}` -- {header_line(payload['environment'])}", "",
           "Speed-up over the dense convolution (same weights, gated):", "",
           "| layer | " + " | ".join(forms) + " |", "|---|" + "---|" * len(forms)]
    for config in configs:
        cells = []
        for form in forms:
            r = table.get((config, form), {})
            cells.append(f"{fmt(r.get('speedup_vs_dense'))}x" if "speedup_vs_dense" in r else r.get("gate", "-"))
        out.append(f"| {config} | " + " | ".join(cells) + " |")
    out += ["", "Useful GMAC/s of each form (its own MACs / median time) as a fraction of the dense "
            "convolution's GMAC/s in the same run (1.00 = as efficient as the dense conv):", "",
            "| layer | " + " | ".join(forms) + " |", "|---|" + "---|" * len(forms)]
    for config in configs:
        dense = table.get((config, "dense"), {}).get("gmacs")
        cells = []
        for form in forms:
            gmacs = table.get((config, form), {}).get("gmacs")
            cells.append(fmt(gmacs / dense) if gmacs and dense else "-")
        out.append(f"| {config} | " + " | ".join(cells) + " |")
    out.append("")
    return out


def _best(rows, variant, mode, memory_format=None):
    """The row of one model variant in its fastest memory format (by median), or in
    ``memory_format`` where one is named; None where there is none."""
    timed = [r for r in rows if r["model_variant"] == variant and r["mode"] == mode and "median_ms" in r
             and memory_format in (None, r["format"])]
    return min(timed, key=lambda r: r["median_ms"]) if timed else None


def _ratio(numerator: dict, denominator: dict) -> tuple[float, str]:
    """Ratio of the two rows' medians, and its description: both medians and, where
    the rows kept their rounds, the same ratio taken round by round (median, quartiles)."""
    ratio = numerator["median_ms"] / denominator["median_ms"]
    text = (f"{ratio:.2f}x ({numerator['median_ms']:.1f} ms {numerator['format']} / "
            f"{denominator['median_ms']:.1f} ms {denominator['format']})")
    a, b = numerator.get("round_ms"), denominator.get("round_ms")
    if a and b and len(a) == len(b):
        median, q1, q3 = per_round_ratio(a, b)
        text += f"; per round {median:.2f}x ({q1:.2f}-{q3:.2f})"
    return ratio, text


def render_backend_cuts(payload: dict, name: str) -> list[str]:
    """Which HetConv CPU forms paid their way in a layer grid that timed them all
    (the grid before the backend redesign): each form's wins, and its wins by more
    than the run-to-run spread of identical code in the same grid (``auto`` against
    the backend it ran; ``fused`` against ``packed`` in training, where packed runs
    fused's code)."""
    settings: dict = {}
    for row in payload["rows"]:
        settings.setdefault((row["config"], row["mode"], row["format"]), {})[row["candidate"]] = row
    identical = []
    for candidates in settings.values():
        auto = candidates["hetconv:auto"]
        pair = [auto["median_ms"], candidates["hetconv:" + auto["ran"]]["median_ms"]]
        pairs = [pair]
        if auto["mode"] == "train":
            pairs.append([candidates["hetconv:fused"]["median_ms"], candidates["hetconv:packed"]["median_ms"]])
        identical += [abs(a - b) / min(a, b) for a, b in pairs]
    identical.sort()
    spread = identical[int(0.95 * len(identical))]
    wins: dict = {}
    for (config, mode, memory_format), candidates in sorted(settings.items()):
        times = {c.split(":")[1]: r["median_ms"] for c, r in candidates.items()
                 if c.startswith("hetconv:") and c != "hetconv:auto" and r["median_ms"] is not None}
        if mode == "train":
            times.pop("packed", None)  # the same code as fused under autograd
        ranked = sorted(times, key=times.get)
        margin = times[ranked[1]] / times[ranked[0]] - 1
        entry = wins.setdefault(ranked[0], [0, []])
        entry[0] += 1
        if margin > spread:
            entry[1].append(f"{config} {mode} {memory_format} (+{margin:.0%} over {ranked[1]})")
    decisions = {
        "reference": "kept: the readable oracle every backend is tested against; the rule's choice for small calls",
        "split": "kept, absorbing masked's cached weights, in-place add and oneDNN post-op as its eager-inference "
                 "preparation: the same grouped KxK + zero-diagonal 1x1 arithmetic",
        "masked": "merged into split (a preparation option of the same form)",
        "fused": "cut: one win beyond the spread in the whole grid, in NCHW training at P=16, for a second autograd "
                 "Function and channels-last copies",
        "packed": "cut: no win beyond the spread (in training it ran fused's code)",
        "loop": "not a candidate of that grid: the P-branch form (2P library calls and gathers for split's two); "
                "moved to the benchmarks as the `p_branch` baseline of `leanconv bench layers`",
    }
    lines = [
        "## Backends kept and cut",
        "",
        f"From `{name}` (every CPU form timed at every VGG-16-CIFAR shape, P = 2-16, batch 64, inference and "
        "training, both memory formats). Run-to-run spread of identical code in that run: median "
        f"{fmt(100 * identical[len(identical) // 2], 1)}%, 95th percentile {fmt(100 * spread, 1)}%, maximum "
        f"{fmt(100 * identical[-1], 1)}% ({len(identical)} pairs). A form pays its way where it is fastest by more "
        "than the 95th percentile.",
        "",
        "| form | fastest in settings | fastest by more than the spread | decision |",
        "|---|---|---|---|",
    ]
    timed = {c.split(":")[1] for candidates in settings.values() for c in candidates if c.startswith("hetconv:")}
    for form in ("reference", "split", "masked", "fused", "packed", "loop"):
        count, beyond = wins.get(form, [0, []])
        if form not in timed:
            lines.append(f"| `{form}` | not timed in this grid | | {decisions[form]} |")
            continue
        lines.append(f"| `{form}` | {count} of {len(settings)} | {'; '.join(beyond) or 'none'} | {decisions[form]} |")
    return lines + [""]


def render_plain_table(payload: dict, name: str) -> list[str]:
    """A benchmark script's result file (``benchmarks/overhead.py``,
    ``benchmarks/rule_vs_measured.py``) as its own table."""
    rows = payload["rows"]
    if not rows:
        return []
    columns = list(rows[0])
    command = payload["config"].get("command")
    lines = [f"## {payload.get('title', name)}", "",
             f"From `{name}`; " + (f"command: `{command}`." if command else "command: not recorded in the file.")]
    lines += [f"- {note}" for note in payload.get("notes", [])]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) if isinstance(row.get(c), float) else str(row.get(c)) for c in columns) + " |"
              for row in rows]
    return lines + [""]


# Issue 22's targets: (model, batch) -> [(mode, P, required standard / HetConv, memory format)]; a format
# of None compares each variant in its faster format, a named one both variants in that format.
MODEL_TARGETS = {
    ("vgg16_cifar", 64): [("infer", 4, 2.8, None), ("infer", 8, 3.6, None), ("infer_folded", 4, 3.0, None),
                          ("infer_folded", 8, 4.0, None), ("train", 4, 2.2, "contiguous"),
                          ("train", 4, 2.2, "channels_last")],
    ("vgg16_cifar", 1): [("infer", 4, 2.5, None)],
    ("resnet18", 16): [("infer_folded", 4, 2.2, None)],
}
SEED_TARGET = 1.3  # issue 13: the public grouped-conv + dense-1x1 form / HetConv, VGG-16 batch 64
LAYER_TARGET = 1.0  # every HetConv layer of the VGG and ResNet-18 grids: auto vs nn.Conv2d
# The fraction of the MAC-ratio speed-up, VGG layers at batch 32-64, channels-last inference, P = 4 and 8:
# 64-channel layers, and 128-512-channel ones.
FRACTION_TARGETS = ((64, 64, 0.65), (128, 512, 0.8))


def _isa(payload: dict) -> str:
    return str(payload.get("environment", {}).get("cpu_capability") or "?")


def render_targets(models: list[tuple[str, dict]], layers: list[tuple[str, dict]],
                   main_job: list[tuple[str, dict]] = ()) -> list[str]:
    """Issue 22's targets (and issue 13's seed and issue 5's memory targets), each as measured
    value vs required, per ISA, from the result files."""
    out = ["### Targets (issue 22) from these files, per ISA", "",
           "ISA: torch's CPU capability on the host of the run (the direct HetConv kernel runs the same ISA; each "
           "file records both). Whole-model figures compare each variant in its faster memory format unless a format "
           "is named (same run, interleaved). `infer_folded`: inference after `leanconv.fuse` on every variant alike "
           "(BatchNorm folded, the ReLU after each convolution fused into it). Rows without a target are shown for "
           "reference. A target is met on the ratio of medians (as the issue states it); \"per round\" is the same "
           "ratio taken in each round (median, quartiles), which shows how far the machine's load moved it. Each "
           "source names the commit it was measured at: runs of different ISAs may come from different commits.", "",
           "| ISA | target | required | measured | met | source |", "|---|---|---|---|---|---|"]
    lines: list[tuple[str, str]] = []

    commits = {name: payload.get("environment", {}).get("git_commit") for name, payload in [*models, *layers, *main_job]}

    def line(isa, what, required, measured, met, source):
        commit = commits.get(source)
        lines.append((isa, f"| {isa} | {what} | {required} | {measured} | {met} | `{source}`"
                           f"{f' (commit {commit})' if commit else ''} |"))

    for name, payload in models:
        rows, config, isa = payload["rows"], payload["config"], _isa(payload)
        model, batch = config.get("model"), config.get("batch")
        targets = MODEL_TARGETS.get((model, batch))
        modes = sorted({r["mode"] for r in rows}, key=["infer", "infer_folded", "train"].index)
        ps = sorted({int(r["model_variant"].split("_p")[1]) for r in rows if r["model_variant"].startswith("hetconv_p")})
        pairs = [(mode, p, None, None) for mode in modes for p in ps] if targets is None else targets
        for mode, p, required, memory_format in pairs:
            standard = _best(rows, "standard", mode, memory_format)
            het = _best(rows, f"hetconv_p{p}", mode, memory_format)
            if standard and het:
                ratio, text = _ratio(standard, het)
                line(isa, f"{model} batch {batch}, {mode}{', ' + memory_format if memory_format else ''}, P={p}: "
                     "standard / HetConv", f">= {required}x" if required else "(none)", text,
                     "-" if required is None else ("yes" if ratio >= required else "NO"), name)
        if (model, batch) == ("vgg16_cifar", 64):
            seed, het = _best(rows, "seed_p4", "infer"), _best(rows, "hetconv_p4", "infer")
            if seed and het:
                ratio, text = _ratio(seed, het)
                line(isa, f"{model} batch {batch}, infer, P=4: public grouped + 1x1 form / HetConv", f">= {SEED_TARGET}x",
                     text, "yes" if ratio >= SEED_TARGET else "NO", name)
        for fmt_ in ("channels_last", "contiguous"):  # issue 5's memory target, still checked
            memory = {r["model_variant"]: r.get("peak_step_mib") for r in rows
                      if r["mode"] == "train" and r["format"] == fmt_}
            standard = memory.get("standard")
            for variant, mib in memory.items():
                if variant.startswith("hetconv") and mib is not None and standard is not None:
                    line(isa, f"{model} batch {batch}, peak training-step memory, {variant}, {fmt_}",
                         f"<= standard ({standard:.0f} MiB)", f"{mib:.0f} MiB", "yes" if mib <= standard else "NO", name)
    for name, payload in layers:
        isa, config = _isa(payload), payload["config"]
        auto = [r for r in payload["rows"] if r.get("median_ms") is not None and r["candidate"] == "hetconv:auto"]
        if not auto:
            continue
        grid, batch = config.get("grid"), config.get("batch")
        for mode in sorted({r["mode"] for r in auto}):
            worst = min((r for r in auto if r["mode"] == mode), key=lambda r: r["speedup_vs_conv2d"])
            required = LAYER_TARGET if grid in ("vgg", "resnet18") else None
            line(isa, f"every HetConv layer of grid {grid}, batch {batch}, {mode}, both formats: auto vs nn.Conv2d",
                 f">= {required}x" if required else "(none)",
                 f"{worst['speedup_vs_conv2d']:.2f}x (slowest: {worst['config']} {worst['format']})",
                 "-" if required is None else ("yes" if worst["speedup_vs_conv2d"] >= required else "NO"), name)
        if grid == "vgg" and batch >= 32:
            for low, high, required in FRACTION_TARGETS:
                chosen = [r for r in auto if r["mode"] == "infer" and r["format"] == "channels_last" and r["P"] in (4, 8)
                          and low <= r["M"] <= high]
                if chosen:
                    worst = min(chosen, key=lambda r: r["fraction_of_mac_ratio"])
                    channels = f"{low}" if low == high else f"{low}-{high}"
                    line(isa, f"VGG layers of {channels} channels, batch {batch}, channels-last inference, P=4 and 8: "
                         "fraction of the MAC-ratio speed-up", f">= {required}",
                         f"{worst['fraction_of_mac_ratio']:.2f} (lowest: {worst['config']})",
                         "yes" if worst["fraction_of_mac_ratio"] >= required else "NO", name)
    for name, payload in main_job:  # make demo's networks, in the format it trains them (NCHW)
        isa = _isa(payload)
        for row in payload["rows"]:
            if row["conv"].startswith("hetconv") and row["format"] == "contiguous":
                step_key = next(k for k in row if k.startswith("train_step_b") and k.endswith("_ms"))
                for what, key in (("batch-1 inference", "latency_speedup"), (f"training step (batch {step_key[12:-3]})",
                                                                               "train_step_speedup")):
                    line(isa, f"main job ({payload['config'].get('model')} width {payload['config'].get('width')}, "
                         f"NCHW), {row['conv']}, {what}: standard / HetConv", "> 1.0x (faster)",
                         f"{row[key]:.2f}x", "yes" if row[key] > 1.0 else "NO", name)
    out += [text for _, text in sorted(lines, key=lambda item: item[0])]
    out.append("")
    return out


# Issue 23's targets: separable layers (DSC, BSConv-U, BSConv-S) against nn.Conv2d.
SEPARABLE_FRACTION_TARGET = 0.5  # batch >= 32, channels-last inference: fraction of the MAC-ratio speed-up
SEPARABLE_LAYER_TARGET = 1.0  # every separable layer, inference and training, both formats
RUNTIME_TARGETS = {"batch > 1": 1.0, "batch 1": 1.5}  # leanconv's optimized path / OpenVINO, same graph
BSCONV_U_VGG_B64_TARGET = 6.0  # VGG-16 BSConv-U vs standard, batch 64, both through optimize_for_inference


def render_separable_targets(separable: list[tuple[str, dict]], main_job: list[tuple[str, dict]],
                             paths: list[tuple[str, dict]]) -> list[str]:
    """Issue 23's targets, each as measured value vs required, per ISA, from the result files."""
    out = ["### Targets (issue 23) from these files, per ISA", "",
           "Separable layers: `leanconv bench separable` (DSC, BSConv-U, BSConv-S against `nn.Conv2d`, VGG-16's "
           "shapes, each layer as a user calls it in eval or training mode). Whole networks: "
           "`benchmarks/inference_paths.py` (`optimized`: `leanconv.optimize_for_inference`; each runtime runs the "
           "same exported graph in a process of its own). Main job: `benchmarks/main_job_speed.py` (NCHW, as "
           "`make demo` runs it).", "",
           "| ISA | target | required | measured | met | source |", "|---|---|---|---|---|---|"]
    lines: list[tuple[str, str]] = []

    def line(isa, payload, what, required, measured, met, source):
        commit = payload.get("environment", {}).get("git_commit")
        lines.append((isa, f"| {isa} | {what} | {required} | {measured} | {met} | `{source}`"
                           f"{f' (commit {commit})' if commit else ''} |"))

    for name, payload in separable:
        isa = _isa(payload)
        rows = [r for r in payload["rows"] if r.get("speedup_vs_conv2d") is not None and r["candidate"] != "conv2d"]
        if not rows:
            continue
        batch = rows[0]["batch"]
        for kind in sorted({r["candidate"] for r in rows}):
            if batch >= 32:
                chosen = [r for r in rows if r["candidate"] == kind and r["mode"] == "infer" and r["format"] == "channels_last"]
                if chosen:
                    worst = min(chosen, key=lambda r: r["fraction_of_mac_ratio"])
                    line(isa, payload, f"{kind} layers, VGG grid, batch {batch}, channels-last inference: fraction of "
                         "the MAC-ratio speed-up", f">= {SEPARABLE_FRACTION_TARGET}",
                         f"{worst['fraction_of_mac_ratio']:.2f} (lowest: {worst['config'].rsplit('-P', 1)[0]})",
                         "yes" if worst["fraction_of_mac_ratio"] >= SEPARABLE_FRACTION_TARGET else "NO", name)
            for mode in ("infer", "train"):
                chosen = [r for r in rows if r["candidate"] == kind and r["mode"] == mode]
                if chosen:
                    worst = min(chosen, key=lambda r: r["speedup_vs_conv2d"])
                    line(isa, payload, f"every {kind} layer, VGG grid, batch {batch}, {mode}, both formats: vs "
                         "nn.Conv2d", f">= {SEPARABLE_LAYER_TARGET}x",
                         f"{worst['speedup_vs_conv2d']:.2f}x (slowest: {worst['config'].rsplit('-P', 1)[0]} "
                         f"{worst['format']})", "yes" if worst["speedup_vs_conv2d"] >= SEPARABLE_LAYER_TARGET else "NO",
                         name)
    for name, payload in main_job:
        isa = _isa(payload)
        for row in payload["rows"]:
            if row["conv"] == "standard" or row["conv"].startswith("hetconv") or row["format"] != "contiguous":
                continue
            step_key = next(k for k in row if k.startswith("train_step_b") and k.endswith("_ms"))
            job = f"main job ({payload['config'].get('model')} width {payload['config'].get('width')}, NCHW), {row['conv']}"
            for what, key in (("batch-1 inference", "latency_speedup"),
                              (f"training step (batch {step_key[12:-3]})", "train_step_speedup")):
                line(isa, payload, f"{job}, {what}: standard / variant", "> 1.0x (faster)", f"{row[key]:.2f}x",
                     "yes" if row[key] > 1.0 else "NO", name)
            if row.get("peak_vs_standard") is not None:
                line(isa, payload, f"{job}, peak training-step memory: variant / standard", "<= 1.0x",
                     f"{row['peak_vs_standard']:.2f}x ({row['peak_train_mib']:.1f} MiB)",
                     "yes" if row["peak_vs_standard"] <= 1.0 else "NO", name)
    for name, payload in paths:
        isa = _isa(payload)
        rows = payload["rows"]
        if "openvino_ms" in (rows[0] if rows else {}):
            for row in rows:
                key = "batch 1" if row["batch"] == 1 else "batch > 1"
                required = RUNTIME_TARGETS[key]
                ratio = row["optimized_ms"] / row["openvino_ms"]
                line(isa, payload, f"{row['network']} batch {row['batch']}, {row['conv']}: leanconv's optimized path / "
                     "OpenVINO (same graph)", f"<= {required}x",
                     f"{ratio:.2f}x ({row['optimized_ms']:.2f} / {row['openvino_ms']:.2f} ms)",
                     "yes" if ratio <= required else "NO", name)
        for row in rows:
            if (row["network"], row["batch"], row["conv"]) == ("vgg16_cifar", 64, "bsconv_u"):
                speedup = row.get("optimized_speedup_vs_standard")
                if speedup is not None:
                    line(isa, payload, "vgg16_cifar batch 64, BSConv-U vs standard, both through optimize_for_inference",
                         f">= {BSCONV_U_VGG_B64_TARGET}x", f"{speedup:.2f}x",
                         "yes" if speedup >= BSCONV_U_VGG_B64_TARGET else "NO", name)
    if not lines:
        return []
    out += [text for _, text in sorted(lines, key=lambda item: item[0])]
    out.append("")
    return out


def render(results: str) -> str:
    files = sorted(glob.glob(os.path.join(results, "*.json")))
    lines = [
        "## Performance",
        "",
        "Generated by `python scripts/render_perf_section.py` from the result files in "
        f"`{results}`; reproduce them with the commands in `benchmarks/README.md`. Times are medians of "
        "interleaved runs in one process; MACs are multiply-accumulates (FLOPs = 2 x MACs). Every timed "
        "candidate first passed the correctness gate against the reference. The measurements behind "
        "choices in the code: [performance_notes.md](performance_notes.md).",
        "",
    ]
    sections = {"models": [], "layers": [], "separable": [], "forms": [], "backends": [], "scripts": []}
    payloads = {"models": [], "layers": [], "main_job": [], "separable": [], "paths": []}
    for path in files:
        with open(path) as handle:
            payload = json.load(handle)
        if not isinstance(payload, dict) or not isinstance(payload.get("config"), dict):
            continue  # not a harness result (e.g. leanconv compare's results.json, a list of rows)
        what = payload["config"].get("what")
        name = os.path.basename(path)
        if "-overhead-" in name or "-rule-vs-measured-" in name or "-depthwise-small" in name or "-direct-internals" in name \
                or "-main-job-speed" in name or "-inference-paths" in name or "-separable-direct" in name:
            sections["scripts"] += render_plain_table(payload, name)
            if "-main-job-speed" in name:
                payloads["main_job"].append((name, payload))
            if "-inference-paths" in name and not name.endswith("-smoke.json"):
                payloads["paths"].append((name, payload))
        elif what == "layers" and "-backends-" in name:  # the pre-redesign grid that timed every form
            sections["backends"] += render_backend_cuts(payload, name)
        elif what == "models":
            sections["models"] += render_models(payload, name)
            payloads["models"].append((name, payload))
        elif what == "layers":
            sections["layers"] += render_layers(payload, name)
            payloads["layers"].append((name, payload))
        elif what == "separable":
            sections["separable"] += render_separable(payload, name)
            payloads["separable"].append((name, payload))
        elif what == "forms":
            sections["forms"] += render_forms(payload, name)
    lines += render_targets(payloads["models"], payloads["layers"], payloads["main_job"])
    lines += render_separable_targets(payloads["separable"], payloads["main_job"], payloads["paths"])
    for part in ("models", "layers", "forms", "separable", "backends", "scripts"):
        lines += sections[part]
    if not files:
        lines.append("(no result files found)")
    return "\n".join(lines) + "\n"


README_START = "<!-- performance:start (generated by scripts/render_perf_section.py --readme README.md) -->"
README_END = "<!-- performance:end -->"


def readme_section(text: str, out: str) -> str:
    """The rendered Markdown down to its targets table, with a link to the rest."""
    parts = text.split("\n### ")
    targets = 1
    while targets < len(parts) and parts[targets].startswith("Targets"):
        targets += 1
    head = "\n### ".join(parts[:targets])
    return f"{README_START}\n{head.rstrip()}\n\nEvery table behind these figures: [{out}]({out}).\n{README_END}"


def update_readme(readme: str, section: str) -> None:
    """Replace the marked performance section of ``readme`` (or append it)."""
    with open(readme) as handle:
        current = handle.read()
    if README_START in current and README_END in current:
        before, _, rest = current.partition(README_START)
        _, _, after = rest.partition(README_END)
        updated = before + section + after
    else:
        updated = current.rstrip("\n") + "\n\n" + section + "\n"
    write_atomic(readme, updated)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results/cpu", help="folder of result JSON files")
    parser.add_argument("--out", default="docs/performance.md", help="Markdown file to write ('-' for stdout)")
    parser.add_argument("--readme", default=None, metavar="README.md",
                        help="also put the header and targets table into this file's marked performance section")
    args = parser.parse_args(argv)
    text = render(args.results)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        write_atomic(args.out, text)
        print(args.out)
    if args.readme:
        update_readme(args.readme, readme_section(text, args.out if args.out != "-" else "docs/performance.md"))
        print(args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
