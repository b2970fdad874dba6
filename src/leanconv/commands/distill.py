"""``leanconv distill``: convert a trained network with data-aware transfer and
train the student by knowledge distillation (see :mod:`leanconv.train.distill`)."""

from __future__ import annotations

import argparse

from .train import _number, add_recipe_arguments, apply_threads, print_final, recipe_overrides

NAME = "distill"
HELP = "compress a trained network: convert it with calibrated weights, then distil (KD) the student"

DEFAULTS = {"out": "runs/distill"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..train.distill import DistillConfig

    S = argparse.SUPPRESS
    default = DistillConfig.default
    parser.add_argument("--teacher", default=S, required=False,
                        help="a leanconv train checkpoint (RUN_DIR/last.pt), a zoo model name, or module:function "
                             "(the last two with --teacher-weights)")
    parser.add_argument("--teacher-weights", default=S, metavar="FILE",
                        help="state_dict file of a zoo or module:function teacher (read with weights_only=True)")
    parser.add_argument("--conv", default=S, metavar="SPEC",
                        help=f"what to convert to: hetconv:p=4, hetconv:p=8,layout=shifted, dsc, bsconv_u, bsconv_s, "
                             f"gwpw:g=4 (default {default('conv')})")
    parser.add_argument("--p", type=_number, default=S, help="the conv's p (HetConv part P, BSConv-S fraction)")
    parser.add_argument("--layout", choices=("blocked", "shifted"), default=S, help="hetconv: kernel placement")
    parser.add_argument("--width", type=float, default=S, help="zoo teacher: its width multiplier (default 1)")
    parser.add_argument("--data", default=S, help="CIFAR python .tar.gz or folder, or 'embedded' (default embedded)")
    parser.add_argument("--out", default=S, help=f"run folder (default {default('out')})")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    kd = parser.add_argument_group("distillation")
    kd.add_argument("--alpha", type=float, default=S,
                    help=f"weight of the label cross-entropy; 1 - alpha weighs the KL term (default {default('alpha'):g})")
    kd.add_argument("--temperature", type=float, default=S, help=f"softmax temperature T (default {default('temperature'):g})")
    kd.add_argument("--feature-weight", type=float, default=S,
                    help="weight of the replaced layers' output matching (relative squared error; default 0)")
    kd.add_argument("--calibration-images", type=int, default=S,
                    help=f"training images for the data-aware conversion (default {default('calibration_images')}; "
                         f"0: weight transfer only)")
    kd.add_argument("--relu-iterations", type=int, default=S,
                    help="passes of the ReLU-aware refinement of layers followed by BatchNorm + ReLU in the "
                         "data-aware conversion (default 0: least squares on the layer outputs only)")
    kd.add_argument("--block-steps", type=int, default=S,
                    help=f"Adam steps of each block's reconstruction after the layer fits of the data-aware "
                         f"conversion: the block's output (after its residual addition and activation) is fitted "
                         f"to the teacher's (default {default('block_steps')}; 0: layer fits only)")
    which = parser.add_argument_group("which layers (as leanconv convert)")
    which.add_argument("--include", action="append", default=S, metavar="PATTERN", help="fnmatch pattern (repeatable)")
    which.add_argument("--exclude", action="append", default=S, metavar="PATTERN", help="fnmatch pattern (repeatable)")
    which.add_argument("--no-skip-stem", dest="skip_stem", action="store_false", default=S,
                       help="also convert the first convolution")
    which.add_argument("--p-policy", choices=("skip", "largest"), default=S,
                       help="layers whose channels p does not divide: skip, or the largest divisor (default skip)")
    add_recipe_arguments(parser, defaults={**DEFAULTS, "epochs": default("epochs"), "batch_size": default("batch_size")},
                         rules={"lr": "0.1 x batch-size / 128"})


def run(args: argparse.Namespace) -> int:
    from ..train.distill import DistillConfig, distill

    apply_threads(args)
    overrides = recipe_overrides(args, exclude=("layout",), fields=DistillConfig.field_names())
    if getattr(args, "layout", None):
        overrides["layer_options"] = {**overrides.get("layer_options", {}), "layout": args.layout}
    config = DistillConfig.resolve(args.config, overrides)
    print_final(distill(config, resume=args.resume), config.out)
    return 0
