"""``leanconv train``: train a zoo model with any convolution kind on CIFAR-10/100."""

from __future__ import annotations

import argparse

NAME = "train"
HELP = "train a zoo model (any conv kind) on CIFAR-10/100 or the embedded set; resumable, DDP via torchrun"


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from error


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """Recipe flags shared by train, compare and reproduce. Defaults are
    suppressed, so only flags given on the command line override the config
    file and the TrainConfig defaults."""
    S = argparse.SUPPRESS
    add = parser.add_argument
    add("--config", default=None, help="YAML or TOML file of recipe values; flags override it")
    add("--epochs", type=int, default=S, help="epochs (default 30)")
    add("--batch-size", type=int, default=S, help="global batch size, split over processes (default 128)")
    add("--seed", type=int, default=S, help="seed of weights, data order and augmentation (default 0)")
    add("--lr", type=float, default=S, help="base learning rate (default 0.1)")
    add("--momentum", type=float, default=S, help="SGD momentum (default 0.9)")
    add("--weight-decay", type=float, default=S, help="weight decay (default 5e-4)")
    add("--nesterov", type=_bool, nargs="?", const=True, default=S, help="Nesterov momentum")
    add("--schedule", choices=("cosine", "multistep", "onecycle"), default=S, help="LR schedule (default cosine)")
    add("--milestones", type=_floats, default=S, help="multistep: epochs, e.g. 100,150 (default 50%%,75%%)")
    add("--gamma", type=float, default=S, help="multistep factor (default 0.1)")
    add("--warmup", type=float, default=S, help="epochs of linear warm-up (default 0)")
    add("--label-smoothing", type=float, default=S, help="cross-entropy label smoothing (default 0)")
    add("--amp", choices=("off", "bf16", "fp16"), default=S, help="autocast dtype (default off; fp16 on CUDA only)")
    add("--channels-last", type=_bool, nargs="?", const=True, default=S, help="channels-last model and inputs")
    add("--workers", type=int, default=S, help="batches prepared ahead in a background thread (default 0)")
    add("--ortho-alpha", type=float, default=S, help="BSConv-S orthonormality penalty weight (default 0.1)")
    add("--augment", type=_bool, default=S, help="random crop + flip (default true)")
    add("--device", default=S, help="auto, cpu, cuda or cuda:N (default auto)")
    add("--hetconv-autotune", type=_bool, nargs="?", const=True, default=S,
        help="let HetConv's auto backend time candidates while training (faster on some CPUs; runs and resumes "
             "are then not bit-for-bit repeatable; default off)")
    add("--no-progress", dest="progress", action="store_false", default=S, help="no progress bars")
    add("--threads", type=int, default=None, help="torch.set_num_threads for this process (default: torch's)")


def apply_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    parser.add_argument("--model", default=S, help="zoo model name (default resnet20_cifar)")
    parser.add_argument("--conv", default=S, help="conv spec: standard, hetconv:p=4, dsc, bsconv_u, bsconv_s, gwpw:g=4")
    parser.add_argument("--p", type=_number, default=S,
                        help="the conv's p: HetConv part P (same as hetconv:p=P) or BSConv-S fraction")
    parser.add_argument("--width", type=float, default=S, help="channel width multiplier (default 1)")
    parser.add_argument("--data", default=S, help="CIFAR python .tar.gz or folder, or 'embedded' (default)")
    parser.add_argument("--download", action="store_true",
                        help="download the official CIFAR-10 archive into --data DIR when DIR holds no CIFAR data")
    parser.add_argument("--out", default=S, help="run folder (default runs/train)")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    add_recipe_arguments(parser)


def recipe_overrides(args: argparse.Namespace, exclude: tuple = ()) -> dict:
    """The TrainConfig fields given as flags."""
    from ..train import TrainConfig

    return {k: v for k, v in vars(args).items() if k in TrainConfig.field_names() and k not in exclude}


def run(args: argparse.Namespace) -> int:
    import os

    from ..train import TrainConfig, train

    apply_threads(args)
    config = TrainConfig.resolve(args.config, recipe_overrides(args))
    if args.download and config.data != "embedded":
        from ..data import download_cifar
        from ..data.cifar import detect_layout

        try:
            detect_layout(config.data)
        except FileNotFoundError:
            config.data = download_cifar("cifar10", config.data)
    summary = train(config, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        final = summary["final"]
        print(f"final test: top1 {final['top1']:.4f} top5 {final['top5']:.4f} loss {final['loss']:.4f} "
              f"(n={final['n']}); run folder {config.out}")
    return 0
