"""Collect the runs of scripts/distill_experiment.sh into one result file
(JSON and a Markdown table): top-1 on the test split, MACs (multiply-
accumulates per 32x32 image; FLOPs = 2 x MACs), parameters and wall time of
every stage of every student.

    python scripts/collect_distill_results.py RUNS_DIR results/cpu/distill-vgg16-w0.5-subset
"""

from __future__ import annotations

import argparse
import json
import os
import re

from leanconv.accounting import count
from leanconv.files import write_atomic
from leanconv.train import load_trained_model

STUDENTS = {"p4": "HetConv P=4", "p8": "HetConv P=8", "dsc": "DSC", "bsu": "BSConv-U"}
STAGES = {
    "a": "(a) transfer only",
    "b": "(b) data-aware conversion, no training",
    "r": "(b) with --relu-iterations 3",
    "c": "(c) + 5 epochs distillation",
    "d": "(d) + 5 epochs fine-tuning (CE only)",
    "e": "(e) from scratch, 30 epochs",
}


def read_run(root: str, name: str) -> dict | None:
    """A run folder's top-1, MACs, parameters and wall time (NAME.time beside it); None if unfinished."""
    folder = os.path.join(root, name)
    if not os.path.exists(os.path.join(folder, "summary.json")):
        return None
    with open(os.path.join(folder, "summary.json")) as handle:
        summary = json.load(handle)
    wall = None
    if os.path.exists(folder + ".time"):
        with open(folder + ".time") as handle:
            found = re.search(r"[0-9.]+", handle.read())
            wall = float(found.group()) if found else None
    model, _ = load_trained_model(os.path.join(folder, "last.pt"))
    cost = count(model, (3, 32, 32))
    return {"top1": summary["final"]["top1"], "n": summary["final"]["n"], "epochs": summary["epochs"],
            "macs": cost.macs, "params": sum(p.numel() for p in model.parameters()), "wall_seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs")
    parser.add_argument("--note", action="append", default=[], help="a line added under the table (how the runs were made)")
    parser.add_argument("out", help="path without extension: writes OUT.json and OUT.md")
    args = parser.parse_args()
    teacher = read_run(args.runs, "teacher")
    rows = {s: {stage: read_run(args.runs, f"{stage}_{s}") for stage in STAGES} for s in STUDENTS}
    payload = {"command": "bash scripts/distill_experiment.sh && python scripts/collect_distill_results.py",
               "notes": args.note, "teacher": teacher, "students": rows, "stages": STAGES,
               "mac_unit": "multiply-accumulates per 32x32 image (FLOPs = 2 x MACs)"}
    write_atomic(args.out + ".json", json.dumps(payload, indent=1) + "\n")

    def cell(run: dict | None) -> str:
        if run is None:
            return "not run"
        wall = "" if run["wall_seconds"] is None else f" ({run['wall_seconds']:.0f} s)"
        return f"{100 * run['top1']:.1f}%{wall}"

    lines = [
        f"Teacher: VGG-16-CIFAR width 0.5, dense, {teacher['epochs']} epochs with train's defaults: "
        f"**{100 * teacher['top1']:.1f}%** top-1 on the {teacher['n']} test images, {teacher['macs'] / 1e6:.1f} M MACs, "
        f"{teacher['params'] / 1e6:.2f} M parameters, {teacher['wall_seconds'] or 0:.0f} s." if teacher else "Teacher: not run.",
        "",
        "| student | M MACs | M params | " + " | ".join(STAGES.values()) + " |",
        "|---|---|---|" + "---|" * len(STAGES),
    ]
    for key, label in STUDENTS.items():
        some = next((r for r in rows[key].values() if r), None)
        macs = f"{some['macs'] / 1e6:.1f}" if some else "-"
        params = f"{some['params'] / 1e6:.2f}" if some else "-"
        lines.append(f"| {label} | {macs} | {params} | " + " | ".join(cell(rows[key][s]) for s in STAGES) + " |")
    lines += ["", "Top-1 on the test split (wall time of the command in brackets, 2-core CPU; (b)-(d) include the "
              "calibration on 1,024 training images). MACs per 32x32 image (FLOPs = 2 x MACs).", *args.note]
    write_atomic(args.out + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
