"""``leanconv convert``: load a model (zoo name or module:function), convert its
convolutions, print the report, optionally save a checkpoint."""

from __future__ import annotations

import argparse
import json

NAME = "convert"
HELP = "convert a model's convolutions to HetConv/DSC/BSConv/GWPW, print what it saves, save a checkpoint"

def _number(text: str):
    """'4' -> 4, '0.25' -> 0.25 (HetConv's p is an int, BSConv-S's a fraction)."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from error


def _size(text: str) -> tuple[int, ...]:
    parts = text.replace("x", ",").split(",")
    try:
        size = tuple(int(p) for p in parts if p.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 3,32,32), got {text!r}") from error
    if len(size) not in (3, 4):
        raise argparse.ArgumentTypeError(f"expected C,H,W or B,C,H,W, got {text!r}")
    return size


def add_model_arguments(parser: argparse.ArgumentParser, *, model_required: bool = True) -> None:
    """Model source and conversion options, shared with ``leanconv export``."""
    parser.add_argument(
        "model", nargs=None if model_required else "?",
        help="a zoo name (see leanconv.models.names()) or 'package.module:function' returning an nn.Module",
    )
    parser.add_argument("--conv", required=model_required, metavar="SPEC",
                        help="the kind to convert to, with its options if you like: standard, hetconv:p=4, "
                             "hetconv:p=4,layout=shifted, dsc, bsconv_u, bsconv_s:p=0.5, gwpw:g=4")
    parser.add_argument("--width", type=float, default=None, help="zoo models: channel width multiplier")
    parser.add_argument("--num-classes", type=int, default=None, help="zoo models: number of classes")
    parser.add_argument("--input-size", type=_size, default=None,
                        help="C,H,W for the shape pass that gives MACs (zoo models default to their own size)")
    layer = parser.add_argument_group("layer options (each belongs to one kind; another kind's option, or one that "
                                      "contradicts --conv's spec, is an error)")
    layer.add_argument("--p", type=_number, default=None, help="hetconv: the part P (int); bsconv_s: bottleneck fraction")
    layer.add_argument("--layout", choices=("blocked", "shifted"), default=None, help="hetconv: kernel placement")
    layer.add_argument("--groups", "--g", type=int, default=None, dest="groups", help="gwpw: groups of the KxK conv")
    layer.add_argument("--with-bn", action="store_true", default=None, help="dsc/bsconv/gwpw: BN inside the layer")
    layer.add_argument("--min-mid-channels", type=int, default=None, help="bsconv_s: lower bound of M'")
    layer.add_argument("--depth-multiplier", type=int, default=None, help="dsc: depth multiplier")
    conversion = parser.add_argument_group("which layers")
    conversion.add_argument("--include", action="append", default=None, metavar="PATTERN",
                            help="fnmatch pattern on module names; only matches are converted (repeatable)")
    conversion.add_argument("--exclude", action="append", default=None, metavar="PATTERN",
                            help="fnmatch pattern on module names to leave alone (repeatable)")
    conversion.add_argument("--no-skip-stem", action="store_true", help="also convert the first convolution")
    conversion.add_argument("--p-policy", choices=("skip", "largest"), default="skip",
                            help="layers whose channels p (or groups) does not divide: skip, or use the largest divisor")
    conversion.add_argument("--convert-subclasses", action="store_true",
                            help="also replace nn.Conv2d subclasses, parametrized and hooked convolutions")
    conversion.add_argument("--allow-costlier", action="store_true",
                            help="replace a layer even when the new one has no fewer MACs per pixel and parameters")


def conv_choice(args) -> tuple[str, dict]:
    """(kind, options) of --conv's spec joined with the layer-option flags."""
    from ..conv_spec import resolve_conv

    flags = {key: getattr(args, key, None)
             for key in ("p", "layout", "groups", "with_bn", "min_mid_channels", "depth_multiplier")}
    return resolve_conv(args.conv, flags, argument="--conv")


def convert_options(args) -> dict:
    options = {"skip_stem": not args.no_skip_stem, "p_policy": args.p_policy}
    if args.include:
        options["include"] = list(args.include)
    if args.exclude:
        options["exclude"] = list(args.exclude)
    for switch in ("convert_subclasses", "allow_costlier"):
        if getattr(args, switch):
            options[switch] = True
    return options


def _zoo_input_size(models, name: str) -> tuple[int, ...]:
    info = getattr(models, "model_info", None)
    if callable(info):
        try:
            return tuple(info(name)["input_size"])
        except (KeyError, TypeError, ValueError):
            pass
    return (3, 32, 32) if "cifar" in name else (3, 224, 224)


def load_source(args) -> tuple[object, dict, tuple[int, ...] | None]:
    """(unconverted model, checkpoint source record, default input size)."""
    from ..conversion import load_callable

    spec = args.model
    if ":" in spec:
        model = load_callable(spec)()
        import torch.nn as nn

        if not isinstance(model, nn.Module):
            raise ValueError(f"{spec} returned {type(model).__name__}, not an nn.Module")
        return model, {"callable": spec}, None
    from .. import models

    names = tuple(models.names()) if hasattr(models, "names") else ()
    if names and spec not in names:
        raise ValueError(f"unknown model {spec!r}; zoo models: {', '.join(names)} (or give module:function)")
    kwargs = {}
    if args.width is not None:
        kwargs["width"] = args.width
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    model = models.create(spec, **kwargs)
    return model, {"zoo": spec, "create_kwargs": kwargs}, _zoo_input_size(models, spec)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--transfer-weights", action="store_true",
                        help="initialise the new layers from the dense weights (an initialisation, not an equivalence)")
    parser.add_argument("--out", default=None, metavar="CKPT", help="save state_dict + rebuild recipe here (atomically)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    from ..conversion import convert, save_converted

    model, source, default_size = load_source(args)
    input_size = args.input_size or default_size
    options = convert_options(args)
    if args.transfer_weights:
        options["transfer_weights"] = True
    kind, kind_options = conv_choice(args)
    converted, report = convert(
        model, kind, input_size=input_size, return_report=True, **options, **kind_options,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    if args.out:
        saved = dict(options, **kind_options)
        saved.pop("transfer_weights", None)
        if input_size is not None:  # the stem is found by execution order: rebuild the same way
            saved["input_size"] = list(input_size)
        save_converted(args.out, converted, source, kind, saved, report)
        if not args.json:
            print(f"\nsaved {args.out} (rebuild: from leanconv.conversion import load_converted)")
    return 0
