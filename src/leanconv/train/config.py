"""The training recipe as one dataclass, loaded from defaults, then a YAML or
TOML file, then command-line flags (each later source overrides the earlier).

Example::

    config = TrainConfig.resolve("recipe.toml", {"epochs": 5})
    config.to_dict()["epochs"]      # 5, whatever the file says
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from ..conv_spec import ConvSpec, resolve_conv
from ..models import names as model_names

__all__ = ["TrainConfig", "SCHEDULES", "AMP_MODES", "load_config_file"]

SCHEDULES = ("cosine", "multistep", "onecycle")
AMP_MODES = ("off", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything that decides a training run; written to RUN_DIR/config.json."""

    model: str = "resnet20_cifar"
    conv: str = "standard"  # conv spec: "hetconv:p=4", "dsc", "gwpw:g=4", ...
    p: float | None = None  # shortcut for the conv spec's p (HetConv part P, BSConv-S fraction)
    width: float = 1.0
    round_channels: bool = False  # round every width to a multiple of HetConv's P / GWPW's groups
    layer_options: dict = field(default_factory=dict)  # extra options for every layer of the kind
    data: str = "embedded"
    epochs: int = 30
    batch_size: int = 128  # global: split over data-parallel ranks
    seed: int = 0
    out: str = "runs/train"
    lr: float | None = None  # None: the linear scaling rule, 0.1 x batch_size / 128 (see base_lr)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"
    milestones: list | None = None  # multistep: epochs; default half and three quarters of the run
    gamma: float = 0.1  # multistep factor
    warmup: float | None = None  # epochs of linear warm-up (fractions allowed); None: min(1, epochs / 10)
    label_smoothing: float = 0.0
    amp: str = "off"
    channels_last: bool = False
    workers: int = 0  # batches prepared ahead in a background thread
    ortho_alpha: float = 0.1  # BSConv-S orthonormality penalty weight (only if the model has BSConvS2d)
    augment: bool = True
    image_size: int | None = None  # resize every image to this square size (after crop and flip); None: as stored
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True
    # HetConv's "auto" backend may time the candidate backends and keep the fastest.
    # Timing differs between processes, and the backends agree only to rounding,
    # so runs (and a resume against an uninterrupted run) would differ; off by
    # default: training then uses the deterministic shape rule.
    hetconv_autotune: bool = False

    MIN_EPOCHS: ClassVar[int] = 1  # distillation allows 0: calibrate, evaluate and save the student
    LR_PER_128: ClassVar[float] = 0.1  # the default learning rate per 128 images of global batch

    def __post_init__(self) -> None:
        self.validate()

    def _check_model(self, need) -> None:
        need(self.model in model_names(), "model", f"a zoo model name ({', '.join(model_names())})")

    def validate(self) -> None:
        def need(condition: bool, name: str, allowed: str) -> None:
            if not condition:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        self._check_model(need)
        need(isinstance(self.epochs, int) and not isinstance(self.epochs, bool) and self.epochs >= self.MIN_EPOCHS,
             "epochs", f"an integer >= {self.MIN_EPOCHS}")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "an integer >= 1")
        need(self.width > 0, "width", "> 0")
        need(self.lr is None or (_is_number(self.lr) and self.lr > 0), "lr",
             "None (0.1 x batch_size / 128) or a number > 0")
        need(0 <= self.momentum < 1, "momentum", "in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}")
        need(self.amp in AMP_MODES, "amp", f"one of {AMP_MODES}")
        need(self.warmup is None or (_is_number(self.warmup) and 0 <= self.warmup < max(self.epochs, 1)),
             "warmup", f"None (min(1, epochs / 10)) or a number of epochs in [0, {max(self.epochs, 1)})")
        need(0 <= self.label_smoothing < 1, "label_smoothing", "in [0, 1)")
        need(self.ortho_alpha >= 0, "ortho_alpha", ">= 0")
        need(isinstance(self.workers, int) and self.workers >= 0, "workers", "an integer >= 0")
        need(self.image_size is None or (isinstance(self.image_size, int) and not isinstance(self.image_size, bool)
                                         and self.image_size >= 1), "image_size", "None or an integer >= 1")
        need(self.p is None or (isinstance(self.p, (int, float)) and not isinstance(self.p, bool) and self.p > 0),
             "p", "None or a number > 0 (HetConv: an integer >= 1)")
        need(isinstance(self.conv, str), "conv", "a conv spec string like 'hetconv:p=4'")
        need(isinstance(self.layer_options, dict), "layer_options", "a mapping")
        self.conv_spec()  # ValueError naming the spec and the allowed kinds/options
        if self.milestones is not None:
            need(all(0 < m <= max(self.epochs, 1) for m in self.milestones), "milestones", f"epochs in (0, {self.epochs}]")

    def base_lr(self) -> float:
        """``lr``, or when unset the linear scaling rule of Goyal et al. 2017
        (https://arxiv.org/abs/1706.02677): 0.1 per 128 images of global batch."""
        return float(self.lr) if self.lr is not None else self.LR_PER_128 * self.batch_size / 128

    def warmup_epochs(self) -> float:
        """``warmup``, or when unset a short linear warm-up: one epoch, at most
        a tenth of the run."""
        return float(self.warmup) if self.warmup is not None else min(1.0, self.epochs / 10)

    def recipe_line(self) -> str:
        """The resolved learning rate and warm-up, saying where each comes from."""
        lr = f"lr {self.base_lr():g}" + (f" ({self.LR_PER_128:g} x batch {self.batch_size} / 128)" if self.lr is None else "")
        warmup = f"warm-up {self.warmup_epochs():g} epoch(s)" + (" (default)" if self.warmup is None else "")
        return f"{lr}, {warmup}, {self.schedule} schedule"

    def conv_spec(self) -> ConvSpec:
        """``conv`` with ``p`` and ``layer_options`` merged in, checked complete."""
        kind, options = resolve_conv(self.conv, {"p": self.p, **self.layer_options}, argument="conv")
        return ConvSpec(kind, options)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def default(cls, name: str):
        """The dataclass default of field ``name``."""
        for f in dataclasses.fields(cls):
            if f.name == name:
                return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        raise ValueError(f"TrainConfig has no field {name!r}; fields: {', '.join(cls.field_names())}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "configuration") -> "TrainConfig":
        known = set(cls.field_names())
        normalised = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(normalised) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**normalised)

    @classmethod
    def resolve(
        cls,
        config_file: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        defaults: Mapping[str, Any] | None = None,
    ) -> "TrainConfig":
        """The dataclass defaults, then ``defaults`` (a command's own), then
        ``config_file`` (YAML or TOML), then ``overrides`` (flags)."""
        values: dict = {}
        for source in (defaults or {}, load_config_file(config_file) if config_file else {}, overrides or {}):
            values.update({str(k).replace("-", "_"): v for k, v in source.items()})
        return cls.from_dict(values, source=config_file or "configuration")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_config_file(path: str) -> dict:
    """A flat mapping from a .yaml/.yml (needs PyYAML), .toml or .json file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    extension = os.path.splitext(path)[1].lower()
    if extension == ".toml":
        import tomllib

        mode, parse = "rb", tomllib.load
    elif extension in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as error:
            raise ValueError(f"{path}: reading YAML needs PyYAML (pip install 'leanconv[train]'), or use TOML") from error
        mode, parse = "r", lambda handle: yaml.safe_load(handle) or {}
    elif extension == ".json":
        mode, parse = "r", json.load
    else:
        raise ValueError(f"{path}: config files must end in .yaml, .yml, .toml or .json")
    try:
        with open(path, mode) as handle:
            values = parse(handle)
    except Exception as error:  # the three parsers raise different types
        raise ValueError(f"{path}: cannot parse ({error})") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values, found {type(values).__name__}")
    return values
