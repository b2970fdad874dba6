"""Knowledge distillation of a trained dense network into its converted
(HetConv, DSC, BSConv, GWPW) version.

``distill(DistillConfig(teacher=..., conv="hetconv:p=4", ...))``:

1. The teacher is loaded: a ``leanconv train`` checkpoint, a zoo name plus a
   state_dict file, or a user's ``module:function`` plus a state_dict file
   (every file read with ``weights_only=True``).
2. The student is ``leanconv.convert(teacher, conv, transfer_weights=True,
   calibration=...)`` on ``calibration_images`` images drawn (by ``seed``)
   from the training split, preprocessed like training batches without
   augmentation: data-aware conversion (:mod:`leanconv.conversion.calibrate`).
   The conversion's options (``include``, ``exclude``, ``skip_stem``,
   ``p_policy``, the spec's ``layout``) apply. ``calibration.json`` records
   the per-layer report.
3. The student trains with :func:`leanconv.train.train`'s loop (every
   option: schedule, AMP, channels-last, resume, DDP, metrics, atomic
   checkpoints) on ``alpha * CE + (1 - alpha) * T^2 * KL(teacher/T || student/T)``
   (Hinton, Vinyals & Dean 2015, https://arxiv.org/abs/1503.02531), plus
   ``feature_weight`` times the mean relative squared error between each
   replaced layer's output and the teacher's dense layer's output. The
   teacher runs in eval mode without gradients; with ``alpha=1`` and no
   feature term it does not run at all (plain fine-tuning).

``epochs=0`` writes the calibrated student (evaluated, ``last.pt`` at epoch
0) without training. ``last.pt`` is an ordinary training checkpoint: its
``model_spec`` rebuilds the student (the teacher's network converted with the
same options), so ``leanconv evaluate`` and :func:`load_trained_model` read it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import Dataset, load_dataset
from ..data.augment import normalize, resize
from ..files import read_torch_file, write_atomic
from ..models import create
from ..models import names as model_names
from .checkpoint import load_checkpoint
from .config import TrainConfig
from .loop import StudentSetup, build_model, train

__all__ = ["DistillConfig", "DistillSetup", "distill", "load_teacher"]

P_POLICIES = ("skip", "largest")


@dataclass
class DistillConfig(TrainConfig):
    """:class:`TrainConfig` plus the teacher, the loss and the conversion.

    ``lr`` unset is training's rule, 0.1 x batch_size / 128: from a student
    calibrated with block reconstruction, 5 epochs of ResNet-20 HetConv P=4 on
    the CIFAR-10 subset reached 69.2% at that rate against 67.9% at 0.04 and
    66.9% at 0.01 x batch_size / 128 (teacher 69.5%, measured at commit fa61867);
    67.4% against 67.6% at 0.04 on a 70.8% teacher (docs/compression.md).
    ``leanconv distill --help`` shows the defaults."""

    MIN_EPOCHS = 0
    LR_PER_128 = 0.1

    teacher: str = ""  # a train checkpoint (last.pt), a zoo name, or module:function
    teacher_weights: str | None = None  # state_dict file for a zoo or module:function teacher
    alpha: float = 0.5  # weight of the cross-entropy with the labels
    temperature: float = 4.0
    feature_weight: float = 0.0
    calibration_images: int = 1024
    relu_iterations: int = 0  # ReLU-aware refinement passes of the data-aware conversion (CalibrationSettings)
    block_steps: int = 1500  # Adam steps of each block's reconstruction after the layer fits (0: layer fits only)
    include: list | None = None
    exclude: list | None = None
    skip_stem: bool = True
    p_policy: str = "skip"
    out: str = "runs/distill"
    conv: str = "hetconv:p=4"
    model: str = ""  # unused: the teacher decides the network

    def _check_model(self, need) -> None:
        need(isinstance(self.teacher, str) and bool(self.teacher), "teacher",
             "a leanconv train checkpoint file, a zoo model name or module:function")

    def validate(self) -> None:
        super().validate()

        def need(condition: bool, name: str, allowed: str) -> None:
            if not condition:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        need(isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1, "alpha", "a number in [0, 1]")
        need(isinstance(self.temperature, (int, float)) and self.temperature > 0, "temperature", "a number > 0")
        need(isinstance(self.feature_weight, (int, float)) and self.feature_weight >= 0, "feature_weight", ">= 0")
        need(isinstance(self.calibration_images, int) and not isinstance(self.calibration_images, bool)
             and self.calibration_images >= 0, "calibration_images", "an integer >= 0 (0: transfer only)")
        need(isinstance(self.relu_iterations, int) and not isinstance(self.relu_iterations, bool)
             and self.relu_iterations >= 0, "relu_iterations", "an integer >= 0 (0: no ReLU-aware refinement)")
        need(isinstance(self.block_steps, int) and not isinstance(self.block_steps, bool)
             and self.block_steps >= 0, "block_steps", "an integer >= 0 (0: no block reconstruction)")
        need(self.p_policy in P_POLICIES, "p_policy", f"one of {P_POLICIES}")
        need(self.conv_spec().kind != "standard", "conv", "a kind to convert to (hetconv:p=4, dsc, bsconv_u, ...)")
        need(not self.round_channels, "round_channels", "False: the teacher fixes the student's channel widths")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)), name,
                 "None or a list of fnmatch patterns")

    def convert_options(self) -> dict:
        options = {"skip_stem": self.skip_stem, "p_policy": self.p_policy}
        for name in ("include", "exclude"):
            if getattr(self, name):
                options[name] = list(getattr(self, name))
        return options


# ------------------------------------------------------------------ teachers
def _state_dict_from(path: str) -> dict:
    """A state_dict file: the dict itself, or the ``model``/``state_dict`` entry
    of a checkpoint-like dict (read with ``weights_only=True``)."""
    payload = read_torch_file(path, "state_dict file")
    if isinstance(payload, dict):
        for key in ("model", "state_dict"):
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
    if not isinstance(payload, dict) or not payload or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise ValueError(f"{path}: not a state_dict (expected a mapping of parameter names to tensors)")
    return payload


def _load_weights(module: nn.Module, path: str, teacher: str) -> None:
    try:
        module.load_state_dict(_state_dict_from(path))
    except RuntimeError as error:
        first = str(error).splitlines()
        raise ValueError(f"--teacher-weights {path} does not fit teacher {teacher}: "
                         f"{' '.join(line.strip() for line in first[:3])[:400]}") from error


def load_teacher(config: DistillConfig, num_classes: int) -> tuple[nn.Module, dict, str, float | None]:
    """(teacher in eval mode, the spec that rebuilds its network, its name, its width). A
    checkpoint teacher trained on resized images (``image_size``) sets ``config.image_size``
    when the config leaves it unset: the student is calibrated, trained and evaluated at the
    size the teacher knows."""
    teacher = config.teacher
    if config.width != 1.0 and (os.path.isfile(teacher) or ":" in teacher):
        raise ValueError(f"width applies to zoo teachers only; teacher {teacher} fixes its own (got width "
                         f"{config.width:g})")
    if os.path.isfile(teacher):
        if config.teacher_weights:
            raise ValueError(f"teacher_weights is for zoo and module:function teachers; {teacher} is a checkpoint "
                             f"that holds its weights")
        checkpoint = load_checkpoint(teacher)
        spec = checkpoint["model_spec"]
        module = build_model(spec)
        module.load_state_dict(checkpoint["model"])
        name, width = spec.get("name", teacher), spec.get("width")
        trained_at = checkpoint.get("config", {}).get("image_size")
        if config.image_size is None and trained_at is not None:
            config.image_size = trained_at  # the student sees what the teacher was trained on
    elif ":" in teacher:
        from ..conversion import load_callable

        module = load_callable(teacher)()
        if not isinstance(module, nn.Module):
            raise ValueError(f"teacher {teacher} returned {type(module).__name__}, not an nn.Module")
        spec, name, width = {"callable": teacher}, teacher, None
    elif teacher in model_names():
        kwargs = {"width": config.width, "num_classes": num_classes}
        module = create(teacher, **kwargs)
        spec, name, width = {"zoo": teacher, "create_kwargs": kwargs}, teacher, config.width
    else:
        raise ValueError(f"teacher must be a leanconv train checkpoint file, a zoo model name "
                         f"({', '.join(model_names())}) or module:function, got {teacher!r}")
    if not os.path.isfile(teacher):
        if not config.teacher_weights:
            raise ValueError(f"teacher {teacher} needs teacher_weights (--teacher-weights FILE, a state_dict): "
                             f"distilling an untrained network teaches nothing")
        _load_weights(module, config.teacher_weights, teacher)
    return module.eval(), spec, name, width


def calibration_images(data: Dataset, count: int, seed: int, image_size: int | None = None) -> torch.Tensor:
    """``count`` training images drawn by ``seed``, preprocessed like training
    batches (normalised, resized to ``image_size`` when given, no augmentation)."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data), generator=generator)[: min(count, len(data))]
    images = normalize(data.images[index], data.mean, data.std)
    return images if image_size is None else resize(images, image_size)


# ------------------------------------------------------------------ the setup
class DistillSetup(StudentSetup):
    """The student's spec, its calibrated starting weights and the distillation loss."""

    def __init__(self, config: DistillConfig, teacher: nn.Module, base: dict, name: str, width, num_classes: int,
                 train_data: Dataset, input_size: tuple[int, ...], log=print):
        spec = config.conv_spec()
        self.config, self.teacher, self.train_data, self.log = config, teacher, train_data, log
        self.kind, self.layer_options = spec.kind, dict(spec.options)
        self.options = {**config.convert_options(), "input_size": list(input_size)}
        self.spec = {"name": name, "width": width, "num_classes": num_classes, "conv": spec.kind,
                     "options": dict(spec.options), "base": base,
                     "converted": {"kind": spec.kind, "options": {**self.options, **self.layer_options}}}
        self.replaced: list[str] = []

    def _convert(self, **extra):
        from ..conversion import convert

        options = {**self.options, "input_size": tuple(self.options["input_size"])}
        return convert(self.teacher, self.kind, return_report=True, **options, **self.layer_options, **extra)

    def initial_state(self, model: nn.Module) -> dict:
        device = next(model.parameters()).device
        self.teacher.to(device)
        images = calibration_images(self.train_data, self.config.calibration_images, self.config.seed,
                                    self.config.image_size)
        extra = {}
        if len(images):
            extra = {"calibration": images, "calibration_settings": {
                "relu_iterations": self.config.relu_iterations, "block_steps": self.config.block_steps}}
        student, report = self._convert(transfer_weights=True, **extra)
        self.replaced = [r.name for r in report.replaced]
        if int(os.environ.get("RANK", "0")) == 0:
            os.makedirs(self.config.out, exist_ok=True)
            write_atomic(os.path.join(self.config.out, "calibration.json"),
                         json.dumps({"images": len(images), **report.to_dict()}, indent=1, default=str) + "\n")
            self.log(str(report))
        return student.state_dict()

    def criterion(self, model: nn.Module, config: TrainConfig):
        device = next(model.parameters()).device
        teacher = self.teacher.to(device).eval()
        if config.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        if not self.replaced:
            _, report = self._convert()
            self.replaced = [r.name for r in report.replaced]
        return DistillationLoss(teacher, model, self.replaced, config)


class DistillationLoss:
    """``alpha * CE + (1 - alpha) * T^2 * KL + feature_weight * feature term``,
    called after the student's forward with that forward's images and logits."""

    def __init__(self, teacher: nn.Module, student: nn.Module, replaced: list[str], config: DistillConfig):
        self.teacher, self.config = teacher, config
        self.student_features: list[torch.Tensor] = []
        self.teacher_features: list[torch.Tensor] = []
        self.needs_teacher = config.alpha < 1 or config.feature_weight > 0
        if config.feature_weight > 0:
            for name in replaced:
                student.get_submodule(name).register_forward_hook(self._keep_student)
                teacher.get_submodule(name).register_forward_hook(self._keep_teacher)

    def _keep_student(self, module, args, output) -> None:
        if module.training:  # not while evaluating
            self.student_features.append(output)

    def _keep_teacher(self, module, args, output) -> None:
        self.teacher_features.append(output)

    def __call__(self, images: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        config = self.config
        student_features, self.student_features[:] = list(self.student_features), []
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
        if not self.needs_teacher:
            return loss
        with torch.no_grad():
            teacher_logits = self.teacher(images).float()
        teacher_features, self.teacher_features[:] = list(self.teacher_features), []
        t = config.temperature
        soft = F.kl_div(F.log_softmax(logits.float() / t, 1), F.log_softmax(teacher_logits / t, 1),
                        reduction="batchmean", log_target=True) * t * t
        loss = config.alpha * loss + (1 - config.alpha) * soft
        if config.feature_weight > 0 and student_features:
            terms = [(s.float() - f.float()).square().sum() / f.float().square().sum().clamp(min=1e-12)
                     for s, f in zip(student_features, teacher_features)]
            loss = loss + config.feature_weight * torch.stack(terms).mean()
        return loss


# ------------------------------------------------------------------ distill
def distill(config: DistillConfig, *, resume: bool = False, train_data: Dataset | None = None,
            test_data: Dataset | None = None, log=print) -> dict:
    """Convert ``config.teacher`` with data-aware transfer and train the student
    by distillation (see the module docstring); returns :func:`train`'s summary.

    Example::

        summary = distill(DistillConfig(teacher="runs/vgg/last.pt", conv="hetconv:p=4", epochs=5,
                                        data="embedded", out="runs/vgg-p4"))
    """
    train_data = train_data or load_dataset(config.data, "train")
    test_data = test_data or load_dataset(config.data, "test")
    teacher, base, name, width = load_teacher(config, train_data.num_classes)
    input_size = tuple(train_data.images.shape[1:])
    if config.image_size is not None:
        input_size = (input_size[0], config.image_size, config.image_size)
    is_main = int(os.environ.get("RANK", "0")) == 0
    setup = DistillSetup(config, teacher, base, name, width, train_data.num_classes, train_data, input_size,
                         log if is_main else (lambda _: None))
    if is_main:
        log(f"distilling {name} into conv={config.conv}: alpha {config.alpha:g}, temperature "
            f"{config.temperature:g}, feature weight {config.feature_weight:g}, "
            f"{min(config.calibration_images, len(train_data))} calibration images")
    return train(config, resume=resume, train_data=train_data, test_data=test_data, log=log, setup=setup)
