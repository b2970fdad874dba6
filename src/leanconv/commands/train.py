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


def recipe_default(name: str, defaults: dict | None = None):
    """The value a recipe field takes when no flag or config file sets it: the
    command's own table (compare's, an experiment's), else TrainConfig's."""
    from ..train import TrainConfig

    return (defaults or {}).get(name, TrainConfig.default(name))


def shown_default(value) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "none"}[value]
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_recipe_arguments(parser: argparse.ArgumentParser, defaults: dict | None = None,
                         rules: dict | None = None) -> None:
    """Recipe flags shared by train, compare and reproduce. Defaults are
    suppressed, so only flags given on the command line override the config
    file and the command's defaults; each help text shows the default the
    command really uses (``defaults``, then TrainConfig's)."""
    S = argparse.SUPPRESS

    rules = {"lr": "0.1 x batch-size / 128", "warmup": "min(1, epochs / 10)", **(rules or {})}  # what None means

    def add(flag: str, help: str, **kwargs) -> None:
        name = flag[2:].replace("-", "_")
        value = recipe_default(name, defaults)
        default = (rules[name] if value is None and name in rules else shown_default(value)).replace("%", "%%")
        parser.add_argument(flag, default=S, help=f"{help} (default {default})", **kwargs)

    parser.add_argument("--config", default=None, help="YAML or TOML file of recipe values; flags override it")
    add("--epochs", "epochs", type=int)
    add("--batch-size", "global batch size, split over processes", type=int)
    add("--seed", "seed of weights, data order and augmentation", type=int)
    add("--lr", "base learning rate", type=float)
    add("--momentum", "SGD momentum", type=float)
    add("--weight-decay", "weight decay", type=float)
    add("--nesterov", "Nesterov momentum", type=_bool, nargs="?", const=True)
    add("--schedule", "LR schedule", choices=("cosine", "multistep", "onecycle"))
    add("--milestones", "multistep: epochs, e.g. 100,150; none: half and three quarters of the run", type=_floats)
    add("--gamma", "multistep factor", type=float)
    add("--warmup", "epochs of linear warm-up", type=float)
    add("--label-smoothing", "cross-entropy label smoothing", type=float)
    add("--amp", "autocast dtype (fp16 on CUDA only)", choices=("off", "bf16", "fp16"))
    add("--channels-last", "channels-last model and inputs", type=_bool, nargs="?", const=True)
    add("--workers", "batches prepared ahead in a background thread", type=int)
    add("--ortho-alpha", "BSConv-S orthonormality penalty weight", type=float)
    add("--augment", "random crop + flip", type=_bool)
    add("--image-size", "resize every image to SIZE x SIZE after crop and flip (bilinear), e.g. 224 for ImageNet "
        "networks on CIFAR; none: as stored", type=int)
    add("--device", "auto, cpu, cuda or cuda:N")
    add("--round-channels", "round every channel width to a multiple of HetConv's p / GWPW's groups",
        type=_bool, nargs="?", const=True)
    add("--hetconv-autotune", "let HetConv's auto backend time candidates while training (faster on some CPUs; "
        "runs and resumes are then not bit-for-bit repeatable)", type=_bool, nargs="?", const=True)
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bars")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for this process (default: torch's)")


def apply_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    parser.add_argument("--model", default=S, help=f"zoo model name (default {recipe_default('model')})")
    parser.add_argument("--conv", default=S, help="conv spec: standard, hetconv:p=4, hetconv:p=4,layout=shifted, dsc, "
                        f"bsconv_u, bsconv_s, gwpw:g=4 (default {recipe_default('conv')})")
    parser.add_argument("--p", type=_number, default=S,
                        help="the conv's p: HetConv part P (same as hetconv:p=P) or BSConv-S fraction")
    parser.add_argument("--width", type=float, default=S,
                        help=f"channel width multiplier (default {recipe_default('width'):g})")
    parser.add_argument("--data", default=S, help="CIFAR python .tar.gz or folder, or 'embedded' "
                        f"(default {recipe_default('data')})")
    parser.add_argument("--download", action="store_true",
                        help="download the official CIFAR-10 archive into --data DIR when DIR holds no CIFAR data")
    parser.add_argument("--out", default=S, help=f"run folder (default {recipe_default('out')})")
    parser.add_argument("--resume", action="store_true",
                        help="continue from RUN_DIR/last.pt; a larger --epochs extends the run")
    add_recipe_arguments(parser)


def recipe_overrides(args: argparse.Namespace, exclude: tuple = (), fields: list[str] | None = None) -> dict:
    """The config fields given as flags (``fields``: TrainConfig's unless given)."""
    from ..train import TrainConfig

    fields = TrainConfig.field_names() if fields is None else fields
    return {k: v for k, v in vars(args).items() if k in fields and k not in exclude}


def print_final(summary: dict, out: str) -> None:
    """The last line of a run, on rank 0 only."""
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        final = summary["final"]
        print(f"final test: top1 {final['top1']:.4f} top5 {final['top5']:.4f} loss {final['loss']:.4f} "
              f"(n={final['n']}); run folder {out}")


def run(args: argparse.Namespace) -> int:
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
    print_final(train(config, resume=args.resume), config.out)
    return 0
