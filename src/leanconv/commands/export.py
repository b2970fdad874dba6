"""``leanconv export``: convert a model (or load a ``leanconv convert``
checkpoint) and export it to ONNX (checked with onnxruntime), TorchScript or
torch.export."""

from __future__ import annotations

import argparse

from .convert import add_model_arguments, conv_choice, convert_options, load_source

NAME = "export"
HELP = "export a (converted) model to ONNX and verify it with onnxruntime; TorchScript / torch.export too"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, model_required=False)
    parser.add_argument("--checkpoint", default=None, help="a checkpoint written by `leanconv convert --out`")
    parser.add_argument("--onnx", default=None, metavar="PATH", help="write an ONNX file here")
    parser.add_argument("--check", action="store_true", help="run the ONNX file in onnxruntime and compare with PyTorch")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17; default 18)")
    parser.add_argument("--hetconv-form", choices=("split", "dense"), default="split",
                        help="HetConv as grouped conv + 1x1 conv + add (split) or one dense conv")
    parser.add_argument("--no-fuse", action="store_true", help="keep BatchNorm layers instead of folding them")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch size instead of a symbolic one")
    parser.add_argument("--torchscript", default=None, metavar="PATH", help="also save torch.jit.trace output here")
    parser.add_argument("--torch-export", default=None, metavar="PATH", help="also save a torch.export program here")


def run(args) -> int:
    from ..conversion import convert, load_converted
    from ..conversion.checkpoint import read_converted

    if args.checkpoint:
        model = load_converted(args.checkpoint)
        source = read_converted(args.checkpoint)["source"]
        input_size = args.input_size
        if input_size is None and "zoo" in source:
            from .convert import _zoo_input_size
            from .. import models

            input_size = _zoo_input_size(models, source["zoo"])
    else:
        if not args.model or not args.conv:
            raise ValueError("give a model and --conv SPEC (e.g. hetconv:p=4), or --checkpoint CKPT")
        model, _, default_size = load_source(args)
        input_size = args.input_size or default_size
        kind, kind_options = conv_choice(args)
        model = convert(model, kind, **convert_options(args), **kind_options)
    if input_size is None:
        raise ValueError("--input-size C,H,W is needed for a module:function model")
    if not (args.onnx or args.torchscript or args.torch_export):
        raise ValueError("nothing to do: give --onnx PATH, --torchscript PATH and/or --torch-export PATH")
    model.eval()
    try:
        return _export(model, args, input_size)
    except RuntimeError as error:
        import sys

        print(f"leanconv export: error: {error}", file=sys.stderr)
        return 1


def _export(model, args, input_size) -> int:
    from ..export import export_onnx, export_program, export_torchscript

    fuse = not args.no_fuse
    if args.onnx:
        result = export_onnx(
            model, None, args.onnx, input_size=input_size, opset=args.opset, hetconv_form=args.hetconv_form, fuse=fuse,
            dynamic_batch=not args.static_batch, check=args.check,
        )
        print(result)
    if args.torchscript:
        export_torchscript(model, None, args.torchscript, input_size=input_size,
                           hetconv_form=args.hetconv_form, fuse=fuse)
        print(f"{args.torchscript}: TorchScript (torch.jit.trace)")
    if args.torch_export:
        export_program(model, None, args.torch_export, input_size=input_size, hetconv_form=args.hetconv_form, fuse=fuse)
        print(f"{args.torch_export}: torch.export program (load with torch.export.load)")
    return 0
