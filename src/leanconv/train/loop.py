"""Training and evaluation of a zoo model on CIFAR.

``train(config)`` runs the recipe of a :class:`TrainConfig`: SGD with
momentum and weight decay, a per-step learning-rate schedule with warm-up,
label smoothing, AMP (bf16/fp16) and channels-last when asked, the BSConv-S
orthonormality penalty when the model has BSConvS2d layers, and DDP when
started by ``torchrun``. RUN_DIR receives config.json, metrics.jsonl (one line
per epoch), last.pt after every epoch (atomically) and summary.json at the end.

Resuming is exact: the data order and augmentation of an epoch depend only on
(seed, epoch) (see :mod:`leanconv.data.loader`), and the checkpoint holds the
model, optimizer, scheduler, scaler and RNG states, so a run killed at any
moment and resumed from last.pt ends with the weights of an uninterrupted run.
Test accuracy is reported, never used to pick a checkpoint. HetConv layers on
``auto`` use the deterministic shape rule during training, not timing (see
``TrainConfig.hetconv_autotune``), or two runs of one recipe would differ.

Example::

    summary = train(TrainConfig(model="vgg16_cifar", width=0.25, epochs=2, out="runs/demo"))
    summary["final"]["top1"]
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import config as leanconv_config
from ..data import BatchLoader, Dataset, load_dataset
from ..files import write_atomic
from ..layers import orthonormal_penalty
from ..layers.protocol import regularizers
from ..models import create
from .checkpoint import load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from .config import TrainConfig
from .distributed import DistributedContext, all_reduce_sum, init_distributed
from .progress import Progress
from .schedule import LRSchedule

__all__ = ["build_model", "model_spec", "evaluate", "train", "load_trained_model", "autocast_context"]


def model_spec(config: TrainConfig, num_classes: int) -> dict:
    """What rebuilds the network: zoo name, conv kind and options, width, classes.

    ``config.p`` and ``config.layer_options`` join the options of ``config.conv``
    (``--conv hetconv --p 4`` is ``--conv hetconv:p=4``); the merged spec must be
    complete (ValueError otherwise, e.g. hetconv without p).
    """
    spec = config.conv_spec()
    rounding = {"round_channels": True} if config.round_channels else {}
    return {"name": config.model, "conv": spec.kind, "options": dict(spec.options), "width": config.width,
            "num_classes": num_classes, **rounding}


def build_model(spec: dict) -> nn.Module:
    """The network a model spec describes: a zoo model with a conv kind, or
    (``"converted"`` in the spec, written by distillation) a base network
    converted by :func:`leanconv.convert` with the recorded options."""
    if "converted" in spec:
        from ..conversion import build_source, convert

        base = spec["base"]
        network = build_source(base) if ("zoo" in base or "callable" in base) else build_model(base)
        options = dict(spec["converted"]["options"])
        if options.get("input_size") is not None:
            options["input_size"] = tuple(options["input_size"])
        return convert(network, spec["converted"]["kind"], inplace=True, **options)
    return create(spec["name"], conv=spec["conv"], width=spec["width"], num_classes=spec["num_classes"],
                  round_channels=spec.get("round_channels", False), **spec["options"])


def autocast_context(amp: str, device: torch.device):
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, *, amp: str = "off", label_smoothing: float = 0.0) -> dict:
    """Top-1, top-5 (fractions), mean cross-entropy and image count, summed
    over data-parallel ranks when a process group is up."""
    was_training = model.training
    model.eval()
    device = loader.device
    loss_sum = correct1 = correct5 = count = 0.0
    for images, labels in loader:
        with autocast_context(amp, device):
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum", label_smoothing=label_smoothing).item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        count += labels.shape[0]
    model.train(was_training)
    loss_sum, correct1, correct5, count = all_reduce_sum([loss_sum, correct1, correct5, count], device)
    n = max(count, 1)
    return {"top1": correct1 / n, "top5": correct5 / n, "loss": loss_sum / n, "n": int(count)}


def load_trained_model(checkpoint_path: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The network of a training checkpoint, weights loaded, in eval mode."""
    checkpoint = load_checkpoint(checkpoint_path)
    model = build_model(checkpoint["model_spec"])
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), checkpoint


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _append_jsonl(path: str, row: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _keep_metrics_until(path: str, epoch: int) -> list[dict]:
    """Drop metrics lines past ``epoch`` (written after the checkpoint a resume
    starts from) and lines cut by a kill; return the rows kept."""
    if not os.path.exists(path):
        return []
    kept = []
    with open(path) as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if row.get("epoch", 0) <= epoch:
                kept.append(row)
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))
    return kept


# Settings that do not change what a run computes: a resume may differ in them.
_RESUME_FREE = ("out", "data", "progress", "workers", "device")


def _recipe_changes(saved: dict, current: dict) -> str:
    """The recipe changes a resume refuses: everything but _RESUME_FREE and a
    larger ``epochs`` (which extends the run and re-plans its schedule, at the
    current recipe's learning rate: ``lr`` may change with it). The learning
    rate itself is compared resolved (:func:`_rate_change`)."""
    keys = sorted((set(saved) | set(current)) - set(_RESUME_FREE) - {"lr"})
    saved = {**{k: TrainConfig.default(k) for k in current if k not in saved}, **saved}  # fields added since
    changed = [k for k in keys if saved.get(k) != current.get(k)]
    if "epochs" in changed and current["epochs"] > saved["epochs"]:
        changed.remove("epochs")
    def shown(key, value) -> str:
        return "None (the default rule)" if value is None and key in ("lr", "warmup") else repr(value)

    return ", ".join(f"{k}: {shown(k, saved.get(k))} -> {shown(k, current.get(k))}" for k in changed)


def _rate_change(saved: list, current: list, config: TrainConfig) -> str:
    """The resolved base learning rates of a checkpoint's schedule against this run's
    ("" when equal): ``lr`` unset resolves by a rule that a newer leanconv may change."""
    if len(saved) == len(current) and all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(saved, current)):
        return ""
    rule = " (lr unset: this version's default rule)" if config.lr is None else ""
    return f"learning rate: {saved[0]:g} -> {current[0]:g}{rule}"


def _plan_schedule(config: TrainConfig, steps_per_epoch: int) -> LRSchedule:
    return LRSchedule(config.schedule, steps_per_epoch, config.epochs, config.warmup_epochs(),
                      tuple(config.milestones or ()), config.gamma)


def _replan_schedule(scheduler, optimizer, schedule: LRSchedule) -> None:
    """Continue a resumed run on ``schedule`` (planned for its new length) from
    the step it reached: the learning rate of the next step is the new plan's."""
    scheduler.lr_lambdas = [schedule for _ in optimizer.param_groups]
    factor = schedule(scheduler.last_epoch)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _write_json(path: str, payload: dict) -> None:
    write_atomic(path, json.dumps(payload, indent=1, default=str) + "\n")


class StudentSetup:
    """What distillation changes in :func:`train`: the model spec (instead of
    the config's zoo model), the weights a fresh run starts from, and the
    loss. See :mod:`leanconv.train.distill`."""

    spec: dict

    def initial_state(self, model: nn.Module) -> dict:
        raise NotImplementedError

    def criterion(self, model: nn.Module, config: TrainConfig) -> Callable:
        """``loss(images, logits, labels) -> tensor``, after the student's forward."""
        raise NotImplementedError


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    train_data: Dataset | None = None,
    test_data: Dataset | None = None,
    log: Callable[[str], None] = print,
    setup: StudentSetup | None = None,
) -> dict:
    """Run ``config`` and return the summary written to RUN_DIR/summary.json.

    ``resume``: continue from RUN_DIR/last.pt when it exists (else start).
    ``train_data``/``test_data``: already loaded data (else ``config.data``).
    ``setup``: a :class:`StudentSetup` (distillation) that supplies the model,
    its starting weights and the loss.
    """
    ctx = init_distributed(config.device)
    try:
        with leanconv_config.benchmarking(config.hetconv_autotune):
            summary = _train(config, ctx, resume, train_data, test_data, log if ctx.is_main else (lambda _: None),
                             setup)
        # Every rank waits for rank 0's last writes before the process group goes away
        # (a rank tearing gloo down while its peer still uses it aborted the peer).
        ctx.barrier()
        return summary
    finally:
        ctx.close()


@dataclass
class _Run:
    """Everything one training run holds between its steps (:func:`_train`)."""

    config: TrainConfig
    ctx: DistributedContext
    log: Callable[[str], None]
    spec: dict
    model: nn.Module
    net: nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    train_data: Dataset
    test_data: Dataset
    train_loader: BatchLoader
    test_loader: BatchLoader
    steps_per_epoch: int
    widths: list | None
    checkpoint_path: str
    metrics_path: str
    criterion: Callable | None = None
    regularized: bool = False
    start_epoch: int = 0
    earlier_epochs: list = field(default_factory=list)
    extensions: list = field(default_factory=list)  # each --resume with a larger --epochs
    train_seconds: float = 0.0
    last: dict | None = None
    run_start: float = field(default_factory=time.perf_counter)

    def save(self, epochs_done: int, metrics: dict) -> None:
        save_checkpoint({
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": epochs_done,
            "rng": rng_states(),
            "data": {"seed": self.config.seed, "next_epoch": epochs_done},
            "config": self.config.to_dict(),
            "model_spec": self.spec,
            "channel_widths": self.widths,
            "extensions": self.extensions,
            "metrics": metrics,
        }, self.checkpoint_path)

    def record(self, epochs_done: int, metrics: dict) -> None:
        """Checkpoint and metrics line of an epoch (rank 0 writes)."""
        self.last = metrics
        if self.ctx.is_main:
            self.save(epochs_done, metrics)
            _append_jsonl(self.metrics_path, metrics)


def _train(config, ctx: DistributedContext, resume, train_data, test_data, log, setup=None) -> dict:
    """setup, resume (or a fresh start), one epoch at a time, finish."""
    run, resuming = _setup(config, ctx, resume, train_data, test_data, log, setup)
    if resuming:
        _resume(run)
    elif ctx.is_main and os.path.exists(run.metrics_path):
        os.unlink(run.metrics_path)  # a run that died before its first checkpoint
    _announce(run)
    run.criterion = setup.criterion(run.model, config) if setup is not None else None
    if ctx.active:
        device = ctx.device
        run.net = nn.parallel.DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda" else None)
    run.run_start = time.perf_counter()
    for epoch in range(run.start_epoch, config.epochs):
        _one_epoch(run, epoch)
    return _finish(run)


def _setup(config, ctx, resume, train_data, test_data, log, setup) -> tuple[_Run, bool]:
    """Checks, data, the model (a student's starting weights), optimizer, schedule, scaler."""
    checkpoint_path = os.path.join(config.out, "last.pt")
    if os.path.exists(checkpoint_path) and not resume:
        raise ValueError(f"{checkpoint_path} exists: pass --resume to continue it, or choose another --out")
    if config.batch_size % ctx.world_size:
        raise ValueError(f"batch_size {config.batch_size} must divide evenly over {ctx.world_size} processes")
    device = ctx.device
    if config.amp == "fp16" and device.type != "cuda":
        raise ValueError("amp fp16 needs a CUDA device; use --amp bf16 on CPU")

    train_data = train_data or load_dataset(config.data, "train")
    test_data = test_data or load_dataset(config.data, "test")
    per_rank = config.batch_size // ctx.world_size
    common = dict(rank=ctx.rank, world_size=ctx.world_size, device=device, channels_last=config.channels_last,
                  image_size=config.image_size)
    train_loader = BatchLoader(train_data, per_rank, shuffle=True, augment=config.augment, seed=config.seed,
                               drop_last=True, workers=config.workers, **common)
    test_loader = BatchLoader(test_data, max(per_rank, 256), **common)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {config.batch_size} is larger than the {len(train_data)} training images of "
                         f"{config.data}")

    _seed_everything(config.seed)
    spec = setup.spec if setup is not None else model_spec(config, train_data.num_classes)
    model = build_model(spec).to(device)
    resuming = resume and os.path.exists(checkpoint_path)
    if setup is not None and not resuming:
        model.load_state_dict(setup.initial_state(model))
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.base_lr(), momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=config.nesterov)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _plan_schedule(config, steps_per_epoch))
    run = _Run(
        config, ctx, log, spec, model, model, optimizer, scheduler,
        torch.amp.GradScaler(device.type) if config.amp == "fp16" else None,
        train_data, test_data, train_loader, test_loader, steps_per_epoch,
        getattr(model, "channel_widths", None),  # zoo models record theirs
        checkpoint_path, os.path.join(config.out, "metrics.jsonl"),
        regularized=bool(regularizers(model)),  # BSConv-S's orthonormality term
    )
    return run, resuming


def _resume(run: _Run) -> None:
    """Restore an exact state from last.pt; a larger --epochs re-plans the schedule."""
    config, path = run.config, run.checkpoint_path
    checkpoint = load_checkpoint(path)  # on the CPU: RNG states must stay there
    if checkpoint["model_spec"] != run.spec:
        raise ValueError(f"{path} holds {checkpoint['model_spec']}, not the configured {run.spec}")
    saved_epochs = checkpoint["config"]["epochs"]
    extending = config.epochs != saved_epochs
    rates = list(run.scheduler.base_lrs)
    changed = ", ".join(filter(None, (
        _recipe_changes(checkpoint["config"], config.to_dict()),
        "" if extending else _rate_change(checkpoint["scheduler"]["base_lrs"], rates, config))))
    if changed:
        raise ValueError(f"{path} was trained with another recipe ({changed}); an exact resume needs "
                         f"the same one (or choose another --out)")
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])  # restores the saved schedule's plan too
    if extending:  # the re-planned schedule runs at this recipe's learning rate
        run.scheduler.base_lrs = rates
        for group, rate in zip(run.optimizer.param_groups, rates):
            group["initial_lr"] = rate
    if run.scaler is not None and checkpoint.get("scaler"):
        run.scaler.load_state_dict(checkpoint["scaler"])
    restore_rng_states(checkpoint["rng"])
    run.start_epoch = checkpoint["epoch"]
    run.extensions = list(checkpoint.get("extensions", []))
    if extending:
        _replan_schedule(run.scheduler, run.optimizer, _plan_schedule(config, run.steps_per_epoch))
        run.extensions.append({"at_epoch": run.start_epoch, "epochs_before": saved_epochs, "epochs_after": config.epochs})
        run.log(f"extending {path} from {saved_epochs} to {config.epochs} epochs: the {config.schedule} "
                f"schedule is re-planned for {config.epochs} epochs at base lr {rates[0]:g} and continues from "
                f"epoch {run.start_epoch}")
    run.earlier_epochs = _keep_metrics_until(run.metrics_path, run.start_epoch) if run.ctx.is_main else []
    run.log(f"resuming {path} after epoch {run.start_epoch}/{config.epochs}")


def _announce(run: _Run) -> None:
    """config.json (rank 0) and the run's one-line description."""
    config, ctx, spec = run.config, run.ctx, run.spec
    if ctx.is_main:
        os.makedirs(config.out, exist_ok=True)
        _write_json(os.path.join(config.out, "config.json"), {
            **config.to_dict(), "model_spec": spec, "channel_widths": run.widths,
            "resolved": {"lr": config.base_lr(), "warmup": config.warmup_epochs()},
            "extensions": run.extensions, "world_size": ctx.world_size})
    params = sum(p.numel() for p in run.model.parameters())
    run.log(f"{spec['name']} conv={config.conv} width={spec.get('width', config.width)} (channel widths "
            f"{', '.join(map(str, run.widths or ['?']))}): {params:,} parameters; "
            f"{len(run.train_data)} train / {len(run.test_data)} test images from {run.train_data.source}; "
            f"{config.epochs} epochs x {run.steps_per_epoch} steps of {config.batch_size} on {ctx.device}"
            f"{f' x {ctx.world_size} processes' if ctx.active else ''}; {config.recipe_line()}")


def _one_epoch(run: _Run, epoch: int) -> None:
    """Train one epoch, evaluate, checkpoint, log."""
    config, ctx, device = run.config, run.ctx, run.ctx.device
    run.train_loader.set_epoch(epoch)
    run.net.train()
    progress = Progress(run.steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}", config.progress and ctx.is_main)
    epoch_start = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    for images, labels in run.train_loader:
        with autocast_context(config.amp, device):
            logits = run.net(images)
            if run.criterion is None:
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
            else:
                loss = run.criterion(images, logits, labels)
        total_loss = loss + orthonormal_penalty(run.model, config.ortho_alpha) if run.regularized else loss
        run.optimizer.zero_grad(set_to_none=True)
        if run.scaler is not None:
            run.scaler.scale(total_loss).backward()
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            total_loss.backward()
            run.optimizer.step()
        run.scheduler.step()
        loss_sum += loss.detach() * labels.shape[0]
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += labels.shape[0]
        if progress.enabled:
            elapsed = time.perf_counter() - epoch_start
            progress.update(loss=loss_sum.item() / seen, acc=correct.item() / seen,
                            img_s=round(seen * ctx.world_size / max(elapsed, 1e-9)))
    progress.close()
    epoch_seconds = time.perf_counter() - epoch_start
    run.train_seconds += epoch_seconds
    train_loss, train_correct, train_seen = all_reduce_sum([loss_sum.item(), correct.item(), seen], device)
    if ctx.active:
        # Each rank's last forward updated its own BN statistics; evaluate
        # (and checkpoint) rank 0's on every shard, as DDP does before a forward.
        for buffer in run.model.buffers():
            torch.distributed.broadcast(buffer, 0)
    test = evaluate(run.model, run.test_loader, amp=config.amp)
    run.record(epoch + 1, {
        "epoch": epoch + 1,
        "lr": run.optimizer.param_groups[0]["lr"],
        "train_loss": train_loss / train_seen,
        "train_acc": train_correct / train_seen,
        "test_loss": test["loss"],
        "test_top1": test["top1"],
        "test_top5": test["top5"],
        "epoch_seconds": epoch_seconds,
        "images_per_second": train_seen / epoch_seconds,
    })
    last = run.last
    run.log(f"epoch {epoch + 1}/{config.epochs}: train loss {last['train_loss']:.4f} acc {last['train_acc']:.4f} | "
            f"test loss {test['loss']:.4f} top1 {test['top1']:.4f} top5 {test['top5']:.4f} | "
            f"{epoch_seconds:.1f}s, {last['images_per_second']:.0f} img/s")


def _finish(run: _Run) -> dict:
    """The final evaluation and summary.json (rank 0 writes)."""
    config = run.config
    if run.last is None and run.start_epoch == 0 and config.epochs == 0:  # distillation's --epochs 0: the student as built
        test = evaluate(run.model, run.test_loader, amp=config.amp)
        run.record(0, {"epoch": 0, "test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test["top5"]})
    last = run.last
    final = evaluate(run.model, run.test_loader, amp=config.amp) if last is None else {
        "top1": last["test_top1"], "top5": last["test_top5"], "loss": last["test_loss"], "n": len(run.test_data)}
    summary = {
        "model_spec": run.spec,
        "conv": config.conv,
        "params": sum(p.numel() for p in run.model.parameters()),
        "epochs": config.epochs,
        "resumed_from_epoch": run.start_epoch,
        "final": final,
        "train_seconds": run.train_seconds + sum(row.get("epoch_seconds", 0.0) for row in run.earlier_epochs),
        "train_seconds_this_process": run.train_seconds,
        "wall_seconds_this_process": time.perf_counter() - run.run_start,
        "world_size": run.ctx.world_size,
        "device": str(run.ctx.device),
        "checkpoint": os.path.abspath(run.checkpoint_path),
    }
    if run.ctx.is_main:
        _write_json(os.path.join(config.out, "summary.json"), summary)
    return summary
