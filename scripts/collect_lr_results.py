"""Table of scripts/lr_default_experiment.sh: final top-1 (and the best
epoch's, for information) of the old and new learning-rate defaults.

    python scripts/collect_lr_results.py RUNS_DIR results/cpu/lr-defaults-subset
"""

from __future__ import annotations

import argparse
import json
import os

from leanconv.files import write_atomic


def _read(folder: str) -> dict | None:
    if not os.path.exists(os.path.join(folder, "summary.json")):
        return None
    with open(os.path.join(folder, "summary.json")) as handle:
        summary = json.load(handle)
    with open(os.path.join(folder, "config.json")) as handle:
        config = json.load(handle)
    with open(os.path.join(folder, "metrics.jsonl")) as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return {"top1": summary["final"]["top1"], "best_epoch_top1": max(r["test_top1"] for r in rows),
            "lr": config["resolved"]["lr"] if "resolved" in config else config["lr"],
            "warmup": config["resolved"]["warmup"] if "resolved" in config else config["warmup"],
            "train_seconds": summary["train_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs")
    parser.add_argument("--note", action="append", default=[], help="a line added under the table (how the runs were made)")
    parser.add_argument("out")
    args = parser.parse_args()
    results, lines = {}, ["| model | batch | old: lr 0.1, no warm-up | new: lr 0.1 x batch/128, warm-up | new - old |",
                          "|---|---|---|---|---|"]
    for model, width in (("vgg16_cifar", 0.5), ("resnet20_cifar", 1)):
        for batch in (64, 128):
            old = _read(os.path.join(args.runs, f"{model}_b{batch}_old"))
            new = _read(os.path.join(args.runs, f"{model}_b{batch}_new"))
            results[f"{model}_b{batch}"] = {"old": old, "new": new, "width": width}

            def cell(run):
                return "not run" if run is None else (f"{100 * run['top1']:.1f}% (lr {run['lr']:g}, warm-up "
                                                      f"{run['warmup']:g})")

            gain = "-" if old is None or new is None else f"{100 * (new['top1'] - old['top1']):+.1f} points"
            lines.append(f"| {model} w{width:g} | {batch} | {cell(old)} | {cell(new)} | {gain} |")
    lines += ["", "Final top-1 on the 850 test images of the CIFAR-10 subset after 30 epochs (cosine schedule, "
              "seed 0); one run each.", *args.note]
    write_atomic(args.out + ".json", json.dumps({"command": "bash scripts/lr_default_experiment.sh && python "
                                                 "scripts/collect_lr_results.py", "notes": args.note, "runs": results}, indent=1) + "\n")
    write_atomic(args.out + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
