"""Collect the runs of scripts/compress_experiment.sh into one result file (JSON)
and a Markdown table: per network and kind, the teacher's top-1 on the test split,
the student's after the per-layer fits only (L), after the default data-aware
conversion with block reconstruction (B) and after 5 epochs of distillation (D),
the wall time of each command, the mean held-out block error after the layer fits
and after the blocks' optimisation, MACs (multiply-accumulates per image at the input
size the network was trained at; FLOPs = 2 x MACs) and parameters.

    python scripts/collect_compress_results.py RUNS_DIR results/cpu/compress-subset
"""

from __future__ import annotations

import argparse
import json
import os
from collect_distill_results import read_run

from leanconv.bench.environment import describe_environment
from leanconv.files import write_atomic

NETWORKS = {"r20": ("ResNet-20", "teacher_r20"), "r56": ("ResNet-56", "teacher_r56"),
            "vgg": ("VGG-16 w0.5", "teacher_vgg"), "wrn": ("WRN-16-8", "teacher_wrn"),
            "r18": ("ResNet-18 at 224", "teacher_r18")}
KINDS = {"p2": "HetConv P=2", "p4": "HetConv P=4", "p8": "HetConv P=8", "dsc": "DSC", "bsu": "BSConv-U",
         "bss": "BSConv-S", "gwpw": "GWC+PWC (g=4)"}
STAGES = {"L": "layer fits only, no training", "B": "+ block reconstruction (default), no training",
          "D": "B + 5 epochs distillation"}


def _run(root: str, name: str) -> dict | None:
    """:func:`read_run` plus the mean block errors of the run's calibration report."""
    run = read_run(root, name)
    if run is None:
        return None
    folder = os.path.join(root, name)
    if run["wall_seconds"] is None:  # no NAME.time: the run's own measure
        with open(os.path.join(folder, "summary.json")) as handle:
            run["wall_seconds"] = json.load(handle).get("wall_seconds_this_process")
    calibration = os.path.join(folder, "calibration.json")
    if os.path.exists(calibration):
        with open(calibration) as handle:
            blocks = [b for b in json.load(handle).get("blocks", []) if b.get("error_block") is not None]
        if blocks:
            run["blocks"] = len(blocks)
            run["block_error_layers"] = sum(b["error_layers"] for b in blocks) / len(blocks)
            # a block whose optimisation was not kept keeps its error after the layer fits
            run["block_error_optimised"] = sum(b["error_block"] if b["kept"] else b["error_layers"]
                                               for b in blocks) / len(blocks)
            run["blocks_kept"] = sum(b["kept"] for b in blocks)
            run["block_seconds"] = sum(b["seconds"] for b in blocks)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs")
    parser.add_argument("out", help="path without extension: writes OUT.json and OUT.md")
    parser.add_argument("--note", action="append", default=[], help="a line added under the table")
    args = parser.parse_args()
    environment = describe_environment()
    host = {"cpu": f"{environment['cpu']}, {environment['logical_cpus']} cores",
            "isa": environment["cpu_capability"], "torch": environment["torch"], "threads_per_run": 1}
    rows = []
    for net, (net_label, teacher_name) in NETWORKS.items():
        teacher = _run(args.runs, teacher_name)
        for kind, kind_label in KINDS.items():
            stages = {stage: _run(args.runs, f"{stage}_{net}_{kind}") for stage in STAGES}
            if any(stages.values()):
                rows.append({"network": net_label, "kind": kind_label, "teacher": teacher, **stages})
    payload = {"command": "bash scripts/compress_experiment.sh RUNS && python scripts/collect_compress_results.py "
                          "RUNS OUT", "host": host, "stages": STAGES, "rows": rows, "notes": args.note,
               "mac_unit": "multiply-accumulates per image at the input size it was trained at: 32x32, "
                           "ResNet-18 224x224 (FLOPs = 2 x MACs)"}
    write_atomic(args.out + ".json", json.dumps(payload, indent=1) + "\n")

    def top1(run: dict | None, teacher: dict | None) -> str:
        if run is None:
            return "not run"
        gap = "" if teacher is None else f" ({100 * (run['top1'] - teacher['top1']):+.1f})"
        return f"{100 * run['top1']:.1f}%{gap}"

    def seconds(run: dict | None) -> str:
        return "-" if run is None or run["wall_seconds"] is None else f"{run['wall_seconds']:.0f}"

    lines = [
        "| network | kind | M MACs | M params | teacher | L: layer fits only | B: + blocks (default) | D: B + 5 epochs "
        "| block error, layer fits -> blocks | seconds L / B / D |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        teacher = row["teacher"]
        some = next(r for r in (row["B"], row["L"], row["D"]) if r)
        blocks = row["B"] or {}
        error = (f"{blocks['block_error_layers']:.3f} -> {blocks['block_error_optimised']:.3f} "
                 f"({blocks['blocks_kept']} of {blocks['blocks']} blocks kept)" if "blocks" in blocks else "-")
        teacher_cell = "-" if teacher is None else f"{100 * teacher['top1']:.1f}%"
        lines.append(
            f"| {row['network']} | {row['kind']} | {some['macs'] / 1e6:.1f} | {some['params'] / 1e6:.3f} | "
            f"{teacher_cell} | {top1(row['L'], teacher)} | "
            f"{top1(row['B'], teacher)} | {top1(row['D'], teacher)} | {error} | "
            f"{seconds(row['L'])} / {seconds(row['B'])} / {seconds(row['D'])} |")
    lines += ["", f"Top-1 on the subset's {some['n']} test images (points against the teacher in brackets). Host: "
              f"{host['cpu']}, ISA {host['isa']}, torch {host['torch']}, one thread per run, runs sharing the "
              "cores (times compare within a column only). Seconds: wall time of the command (L and B: loading, "
              "calibration on 1,024 training images unless the script says fewer, "
              "evaluation; D: the 5 epochs of distillation resumed from B, at lr 0.05 = train's rule 0.1 x 64/128). "
              "Block error: mean over the blocks of "
              "the relative held-out output error against the teacher's block. MACs per image at the size the "
              "network was trained at (32x32; ResNet-18 224x224) "
              "(FLOPs = 2 x MACs).", *args.note]
    write_atomic(args.out + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
