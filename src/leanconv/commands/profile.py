"""``leanconv profile``: parameters and MACs of a model with each conv kind.

    leanconv profile                                  # VGG-16 (CIFAR), HetConv P=4, per layer
    leanconv profile vgg16_cifar --conv hetconv --sweep-p 1,2,4,8,16,32,64 --convention paper
    leanconv profile resnet20_cifar --conv standard,hetconv:p=4,dsc,bsconv_u,bsconv_s,gwpw:g=4
    leanconv profile mypackage.models:build --conv hetconv:p=2 --input-size 3,64,64 --json

Zoo models are built with the kind directly (``models.create``); a
``module:function`` model is built and then converted with ``leanconv.convert``.
MACs are multiply-accumulates (FLOPs = 2 x MACs); see ``leanconv.accounting``
for the ``exact`` and ``paper`` conventions.
"""

from __future__ import annotations

import argparse
import json

from .convert import _size

NAME = "profile"
HELP = "parameters and MACs of a model (zoo name or module:function) with each conv kind, per layer or side by side"

DEFAULT_MODEL = "vgg16_cifar"
DEFAULT_CONV = "hetconv:p=4"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints such as 1,2,4,8, got {text!r}") from error
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive ints such as 1,2,4,8, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help=f"zoo name or 'package.module:function' returning an nn.Module (default {DEFAULT_MODEL})")
    parser.add_argument("--conv", default=None,
                        help="conv spec or comma list, e.g. hetconv:p=4 or standard,hetconv:p=2,dsc,bsconv_s,gwpw:g=4 "
                             f"(default {DEFAULT_CONV}; with --sweep-p the kind alone, e.g. hetconv)")
    parser.add_argument("--sweep-p", type=_int_list, default=None, metavar="P,P,...",
                        help="one row per value of the kind's p (HetConv's part), e.g. 1,2,4,8,16,32,64")
    parser.add_argument("--convention", choices=("exact", "paper", "both"), default="exact",
                        help="exact: MACs as computed; paper: the HetConv paper's reporting convention (default exact)")
    parser.add_argument("--per-layer", action="store_true",
                        help="per-layer table of every variant (the default when there is one variant)")
    parser.add_argument("--input-size", type=_size, default=None, help="C,H,W (zoo models default to their own)")
    parser.add_argument("--width", type=float, default=None, help="zoo models: channel width multiplier")
    parser.add_argument("--num-classes", type=int, default=None, help="zoo models: number of classes")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def variant_specs(args):
    """The ConvSpecs to profile, from --conv and --sweep-p."""
    from ..conv_spec import parse_conv_specs

    text = args.conv if args.conv is not None else ("hetconv" if args.sweep_p else DEFAULT_CONV)
    if args.sweep_p:
        specs = parse_conv_specs(text, complete=False)
        if len(specs) != 1:
            raise ValueError(f"--sweep-p sweeps one conv kind, got --conv {text!r}")
        spec = specs[0]
        if spec.kind != "hetconv":
            raise ValueError(f"--sweep-p sweeps HetConv's part p; --conv must be hetconv, got {spec.kind!r}")
        if "p" in spec.options:
            raise ValueError(f"--sweep-p gives p; --conv must not set it too, got {text!r}")
        return [spec.with_options(p=p).check() for p in args.sweep_p]
    return parse_conv_specs(text, complete=True)


class ModelSource:
    """Builds the model of one conv spec: the zoo directly, a callable through convert."""

    def __init__(self, model: str, width: float | None, num_classes: int | None):
        from .. import models

        self.model = model
        self.create_kwargs = {k: v for k, v in (("width", width), ("num_classes", num_classes)) if v is not None}
        if ":" in model:
            from ..conversion import load_callable

            if self.create_kwargs:
                raise ValueError(f"--width and --num-classes apply to zoo models, not to {model!r}")
            self.factory = load_callable(model)
            self.default_input_size = None
        else:
            if model not in models.names():
                raise ValueError(f"unknown model {model!r}; zoo models: {', '.join(models.names())} "
                                 f"(or give package.module:function)")
            self.factory = None
            self.default_input_size = tuple(models.model_info(model)["input_size"])

    def build(self, spec, input_size):
        import torch.nn as nn

        from .. import models

        if self.factory is None:
            return models.create(self.model, conv=spec.kind, **self.create_kwargs, **spec.options)
        model = self.factory()
        if not isinstance(model, nn.Module):
            raise ValueError(f"{self.model} returned {type(model).__name__}, not an nn.Module")
        if spec.kind == "standard":
            return model
        from ..conversion import convert

        return convert(model, spec.kind, input_size=input_size, **spec.options)


def profile(args) -> dict:
    """Counts for the baseline (standard) and each variant, as a JSON-able dict."""
    from ..accounting import count
    from ..conv_spec import ConvSpec

    specs = variant_specs(args)
    source = ModelSource(args.model, args.width, args.num_classes)
    input_size = tuple(args.input_size or source.default_input_size or ())
    if not input_size:
        raise ValueError(f"--input-size is needed for {args.model!r} (e.g. --input-size 3,224,224)")
    conventions = ["exact", "paper"] if args.convention == "both" else [args.convention]
    per_layer = args.per_layer or len(specs) == 1

    def measure(spec):
        model = source.build(spec, input_size)
        reports = {c: count(model, input_size, convention=c) for c in conventions}
        return model, reports

    _, baseline = measure(ConvSpec("standard"))
    rows = []
    for spec in specs:
        _, reports = measure(spec)
        first = reports[conventions[0]]
        row = {"conv": str(spec), "params": first.params,
               "params_reduction": baseline[conventions[0]].params / first.params}
        for c in conventions:
            row[f"macs_{c}"] = reports[c].macs
            row[f"macs_reduction_{c}"] = baseline[c].macs / reports[c].macs if reports[c].macs else None
        if per_layer:
            row["layers"] = {c: reports[c].to_dict()["rows"] for c in conventions}
            row["tables"] = {c: reports[c].table() for c in conventions}
        rows.append(row)
    return {
        "model": args.model, "input_size": list(input_size), "conventions": conventions,
        "unit": "MACs per input of input_size (FLOPs = 2 x MACs)",
        "baseline": {"conv": "standard", "params": baseline[conventions[0]].params,
                     **{f"macs_{c}": baseline[c].macs for c in conventions}},
        "rows": rows,
    }


def render(result: dict) -> str:
    conventions = result["conventions"]
    lines = [f"{result['model']}, input {tuple(result['input_size'])}; MACs in millions (FLOPs = 2 x MACs), "
             f"convention {' and '.join(conventions)}; reductions against the standard model "
             f"({result['baseline']['params']:,} parameters, "
             + ", ".join(f"{result['baseline'][f'macs_{c}'] / 1e6:.2f} M MACs {c}" for c in conventions) + ")", ""]
    for row in result["rows"]:
        for c in conventions:
            if "tables" in row:
                lines += [f"{row['conv']} -- per layer, convention {c!r}:", row["tables"][c], ""]
    conv_width = max(len("conv"), *(len(r["conv"]) for r in result["rows"]))
    header = f"{'conv':<{conv_width}}  {'params':>12}  {'params red.':>11}"
    for c in conventions:
        header += f"  {'MACs (M) ' + c:>16}  {'MACs red.':>9}"
    lines += [header, "-" * len(header)]
    for row in result["rows"]:
        line = f"{row['conv']:<{conv_width}}  {row['params']:>12,}  {row['params_reduction']:>10.2f}x"
        for c in conventions:
            reduction = row[f"macs_reduction_{c}"]
            line += f"  {row[f'macs_{c}'] / 1e6:>16.2f}  " + (f"{reduction:>8.2f}x" if reduction else f"{'-':>9}")
        lines.append(line)
    return "\n".join(lines)


def run(args) -> int:
    result = profile(args)
    if args.json:
        for row in result["rows"]:
            row.pop("tables", None)
        print(json.dumps(result, indent=2))
    else:
        print(render(result))
    return 0
