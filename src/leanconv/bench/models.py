"""Whole-model benchmark: inference and one training step of a model from the
zoo built with standard convolutions, exact HetConv (``auto``) and the public
"seed" form, in both memory formats, with peak training memory. Mode
``infer_folded`` is inference after :func:`leanconv.fuse` (BatchNorm folded into
the convolutions) for every variant alike.

Speed-ups are ratios of medians (``speedup_vs_*``); ``per_round_speedup`` is the
same ratio taken in each round and its median and quartiles (both sides timed in
the same round, so a load that drifts between rounds cancels), and ``round_ms``
keeps every round's time.

Gate: before timing, the HetConv model's output with its chosen backends is
compared with the same model whose HetConv layers are replaced by the
equivalent ``nn.Conv2d`` (eval mode, same weights); a model that differs by
more than the tolerance is not timed.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..accounting import count
from ..layers import ApproximateHetConv2d, HetConv2d, LeanConvLayer
from .memory import peak_allocated_bytes
from .timing import per_round_ratio, time_interleaved

__all__ = ["build_variants", "bench_models", "to_seed_form", "to_dense_form", "trained_looking_batchnorm"]


@torch.no_grad()
def trained_looking_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm2d of ``model`` running statistics that are not the identity
    (mean in [-0.5, 0.5), variance in [0.5, 1.5)), as a trained network has; returns it."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=generator) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
    return model


def to_seed_form(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every (blocked) HetConv2d replaced by the public
    grouped-conv + dense-1x1 form computing the same function."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, HetConv2d) and child.layout == "blocked":
                setattr(parent, name, ApproximateHetConv2d.from_hetconv(child))
    return model


def build_variants(create: Callable[..., nn.Module], name: str, ps: Sequence[int], seed_ps: Sequence[int] = ()) -> dict[str, nn.Module]:
    """{"standard": ..., "hetconv_p4": ..., "seed_p4": ...} with the zoo's ``create``."""
    torch.manual_seed(0)
    variants = {"standard": create(name, conv="standard")}
    for p in ps:
        torch.manual_seed(0)
        variants[f"hetconv_p{p}"] = create(name, conv="hetconv", p=p)
        if p in seed_ps:
            variants[f"seed_p{p}"] = to_seed_form(variants[f"hetconv_p{p}"])
    return variants


def to_dense_form(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every leanconv layer that one convolution computes (HetConv2d,
    the approximate form) replaced by that ``nn.Conv2d`` (materialised weight): the reference for the
    gate, whatever backend the layers are set to."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            dense = child.to_conv2d() if isinstance(child, LeanConvLayer) else None
            if dense is not None:
                setattr(parent, name, dense)
    return model


def _gate(model: nn.Module, x: torch.Tensor) -> float:
    """Relative max difference between ``model`` and its dense form (eval mode)."""
    model.eval()
    reference_model = to_dense_form(model).eval()
    with torch.no_grad():
        fast = model(x)
        reference = reference_model(x)
    return (fast - reference).abs().max().item() / max(1.0, reference.abs().max().item())


def bench_models(
    variants: dict[str, nn.Module],
    *,
    input_shape: Sequence[int] = (64, 3, 32, 32),
    num_classes: int = 10,
    modes: Sequence[str] = ("infer", "train"),
    formats: Sequence[str] = ("contiguous", "channels_last"),
    warmup: int = 2,
    repeats: int = 7,
    tolerance: float = 1e-4,
    memory: bool = True,
) -> list[dict]:
    """Rows: variant x mode x format with median/min/max/spread ms, speed-up over
    the standard model in the same format and over its fastest format, MACs,
    GMAC/s, peak training-step memory."""
    torch.manual_seed(0)
    x0 = torch.randn(*input_shape)
    target = torch.randint(0, num_classes, (input_shape[0],))
    macs = {name: count(model, tuple(input_shape)).macs for name, model in variants.items()}
    rows = []
    for mode in modes:
        runners, memory_runs, gates, built = {}, {}, {}, {}
        for fmt in formats:
            memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
            x = x0.contiguous(memory_format=memory_format)
            for name, base in variants.items():
                model = copy.deepcopy(base).to(memory_format=memory_format)
                if mode == "infer_folded":
                    from ..fuse import fuse

                    model = fuse(model.eval())
                built[(name, fmt)] = model
                gates[(name, fmt)] = (
                    _gate(model, x) if any(isinstance(m, LeanConvLayer) and m.to_conv2d() is not None
                                           for m in model.modules()) else None
                )
                if mode in ("infer", "infer_folded"):
                    model.eval()

                    def run(model=model, x=x):
                        with torch.no_grad():
                            return model(x)
                else:
                    model.train()
                    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

                    def run(model=model, x=x, optimizer=optimizer):
                        optimizer.zero_grad(set_to_none=True)
                        F.cross_entropy(model(x), target).backward()
                        optimizer.step()
                gate = gates[(name, fmt)]
                if gate is None or gate <= tolerance:
                    runners[(name, fmt)] = run
        timings = time_interleaved({f"{n}|{f}": r for (n, f), r in runners.items()}, warmup=warmup, repeats=repeats)
        for (name, fmt), run in runners.items():
            if memory and mode == "train":
                memory_runs[(name, fmt)] = peak_allocated_bytes(run)
        best_standard = min(
            (t.median for key, t in timings.items() if key.startswith("standard|")), default=None
        )
        for fmt in formats:
            for name in variants:
                timing = timings.get(f"{name}|{fmt}")
                gate = gates.get((name, fmt))
                row = {
                    "model_variant": name, "mode": mode, "format": fmt, "batch": input_shape[0],
                    "gate_error": gate, "gate": "n/a" if gate is None else ("pass" if timing else "FAIL"),
                    "macs": macs[name],
                }
                if timing is not None:
                    standard = timings.get(f"standard|{fmt}")
                    row.update(
                        median_ms=timing.median * 1e3, min_ms=timing.minimum * 1e3, max_ms=timing.maximum * 1e3,
                        spread=timing.spread, round_ms=[t * 1e3 for t in timing.rounds],
                        speedup_vs_standard_same_format=standard.median / timing.median if standard else None,
                        speedup_vs_best_standard=best_standard / timing.median if best_standard else None,
                        mac_speedup=macs["standard"] / macs[name],
                        # a training step counted as 3 x the forward MACs (forward, input and weight gradients)
                        gmacs=macs[name] * (3 if mode == "train" else 1) / timing.median / 1e9,
                    )
                    if standard:  # the same ratio taken round by round (median, quartiles)
                        paired = per_round_ratio(list(standard.rounds), list(timing.rounds))
                        row.update(per_round_speedup=paired[0], per_round_speedup_q1=paired[1],
                                   per_round_speedup_q3=paired[2])
                if (name, fmt) in memory_runs:
                    row["peak_step_mib"] = memory_runs[(name, fmt)] / 2**20
                if any(isinstance(m, HetConv2d) for m in variants[name].modules()):
                    row["backends"] = ",".join(
                        str(m.last_backend) for m in built[(name, fmt)].modules() if isinstance(m, HetConv2d)
                    )
                rows.append(row)
    return rows
