"""``leanconv evaluate``: top-1, top-5, loss and image count of a training checkpoint."""

from __future__ import annotations

import argparse
import sys

NAME = "evaluate"
HELP = "evaluate a training checkpoint (RUN_DIR/last.pt) on CIFAR or the embedded set"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="RUN_DIR/last.pt written by leanconv train")
    parser.add_argument("--data", default=None,
                        help="CIFAR python .tar.gz or folder, or 'embedded' (default: the data the checkpoint was "
                             "trained on, its config's data)")
    parser.add_argument("--split", choices=("test", "train"), default="test", help="split (default test)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--json", action="store_true", help="print one JSON object {top1, top5, loss, n} (fractions)")


def run(args: argparse.Namespace) -> int:
    import json

    from ..data import BatchLoader, load_dataset
    from ..train import evaluate, load_trained_model
    from ..train.distributed import pick_device

    device = pick_device(args.device, 0)
    model, checkpoint = load_trained_model(args.checkpoint, device)
    source = args.data if args.data is not None else checkpoint["config"]["data"]
    chosen_by = "--data" if args.data is not None else "the checkpoint's training data; --data chooses another"
    print(f"leanconv evaluate: {args.split} split of {source} ({chosen_by})", file=sys.stderr, flush=True)
    data = load_dataset(source, args.split)
    classes = checkpoint["model_spec"]["num_classes"]
    if data.num_classes != classes:
        raise ValueError(f"{args.checkpoint} predicts {classes} classes but {source} has {data.num_classes}")
    image_size = checkpoint["config"].get("image_size")  # the size it was trained at
    result = evaluate(model, BatchLoader(data, args.batch_size, device=device, image_size=image_size))
    if args.json:
        print(json.dumps(result))
    else:
        spec = checkpoint["model_spec"]
        print(f"{spec['name']} conv={checkpoint['config']['conv']} width={spec['width']} "
              f"(epoch {checkpoint['epoch']}) on {args.split} of {data.source}: top1 {result['top1']:.4f} "
              f"top5 {result['top5']:.4f} loss {result['loss']:.4f} n={result['n']}")
    return 0
