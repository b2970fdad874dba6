"""``leanconv reproduce``: the papers' experiments with their recipes.

hetconv-vgg16-cifar10 (Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120,
table 1): VGG-16 on CIFAR-10 with HetConv at P = 1, 2, 4, 8, 16, 32, 64
(P = 1 is the standard network), 200 epochs of SGD, learning rate 0.1,
momentum 0.9, weight decay 5e-4, batch 128, cosine (or --schedule multistep)
schedule. Each variant trains in its own folder and resumes where it stopped.
Meant for the full data set and a GPU; ``--epochs`` shortens it.
"""

from __future__ import annotations

import argparse

from .compare import run_comparison
from .train import add_recipe_arguments

NAME = "reproduce"
HELP = "run a paper's experiment (hetconv-vgg16-cifar10), resumable per variant"

EXPERIMENTS = {
    "hetconv-vgg16-cifar10": {
        "convs": ["standard"] + [f"hetconv:p={p}" for p in (2, 4, 8, 16, 32, 64)],
        "recipe": {"model": "vgg16_cifar", "width": 1.0, "epochs": 200, "batch_size": 128, "lr": 0.1, "warmup": 0.0,
                   "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine",
                   "out": "runs/reproduce-hetconv-vgg16-cifar10"},
    },
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    recipe = EXPERIMENTS["hetconv-vgg16-cifar10"]["recipe"]  # the only experiment: its recipe is the default
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS), help="which experiment")
    parser.add_argument("--data", required=True, help="CIFAR-10 python .tar.gz or folder (or 'embedded' to try it)")
    parser.add_argument("--out", default=S, help=f"output folder (default {recipe['out']})")
    parser.add_argument("--width", type=float, default=S, help=f"width multiplier, 1 is the paper's (default {recipe['width']:g})")
    parser.add_argument("--ps", default=None, help="only these P, e.g. 1,4,8 (P=1 is the standard network)")
    parser.add_argument("--latency-batch", type=int, default=1, help="images per timed inference call (default 1)")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved timing rounds (default 15)")
    add_recipe_arguments(parser, recipe)


def _selected(convs: list[str], ps: str | None) -> list[str]:
    """The variants whose P (1 for the standard network) ``--ps`` lists."""
    if ps is None:
        return convs
    from ..conv_spec import parse_conv_spec

    by_p = {int(parse_conv_spec(c).options.get("p", 1)): c for c in convs}
    try:
        wanted = [int(p) for p in ps.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"--ps must be comma-separated integers such as 1,4,8, got {ps!r}") from None
    unknown = [p for p in wanted if p not in by_p]
    if unknown or not wanted:
        raise ValueError(f"--ps {ps!r}: P must be among {', '.join(map(str, by_p))}, got {unknown or 'none'}")
    return [by_p[p] for p in by_p if p in wanted]


def run(args: argparse.Namespace) -> int:
    experiment = EXPERIMENTS[args.experiment]
    return run_comparison(args, experiment["recipe"], _selected(experiment["convs"], args.ps))
