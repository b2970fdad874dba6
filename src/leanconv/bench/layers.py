"""Single-layer benchmark: HetConv backends (and the separable family) against
``nn.Conv2d`` of the same shape, correctness-gated, timed interleaved.

For every configuration (channels, size, P, batch), mode (``infer``: no
autograd; ``train``: forward + backward to input and parameters) and memory
format, all candidates get the same input; each is first checked against the
dense ``nn.Conv2d`` holding the HetConv's materialised weight (the gate), then
timed side by side. A candidate that fails the gate is reported, not timed.

Candidates for a HetConv row:

* ``conv2d``: ``nn.Conv2d`` with the dense weight (the standard layer);
* ``hetconv:<backend>``: :class:`leanconv.HetConv2d` with that backend
  (``auto``: the deterministic rule; ``auto-measured``: auto with measuring on,
  see :mod:`leanconv.ops.measure`);
* ``seed``: the public "approximate" form, grouped conv + dense 1x1 conv
  modules summed (:class:`leanconv.layers.ApproximateHetConv2d`, redundant weights 0);
* ``p_branch``: the P-branch form of public implementations (2P library calls);
* ``public_loop``: the public loop form, two small convolutions per filter
  (its channels gathered), written here as a baseline; inference only, timed
  over 2 calls after 1 warm-up (it is 1-2 orders of magnitude slower, and would
  otherwise take most of a grid's time).

MACs are the candidate's own count per call (HetConv's for every exact HetConv
candidate, the dense count for ``conv2d``, the seed's larger count for
``seed``); GMAC/s = MACs / median time / 1e9 (FLOPs = 2 x MACs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import config as leanconv_config
from ..accounting import conv_macs_per_output, hetconv_macs_per_output, layer_macs
from ..layers import BSConvS2d, BSConvU2d, DSConv2d, HetConv2d, ApproximateHetConv2d
from ..ops.conv_geometry import centre_taps
from ..ops.hetconv_layout import group_filter_order_list, kxk_channel_index, pointwise_channel_index
from .timing import Timing, time_interleaved

__all__ = ["LayerConfig", "GRIDS", "layer_grid", "bench_layer_grid", "bench_hetconv_config", "bench_separable_config", "PublicLoopHetConv"]


@dataclass(frozen=True)
class LayerConfig:
    in_channels: int
    out_channels: int
    size: int
    p: int
    batch: int
    kernel_size: int = 3
    stride: int = 1

    def __str__(self) -> str:
        s = f"M{self.in_channels}-N{self.out_channels}-{self.size}x{self.size}-P{self.p}-B{self.batch}"
        return s + (f"-s{self.stride}" if self.stride != 1 else "")

    @property
    def out_size(self) -> int:
        pad = self.kernel_size // 2
        return (self.size + 2 * pad - self.kernel_size) // self.stride + 1

    @property
    def output_elements(self) -> int:
        return self.batch * self.out_size**2 * self.out_channels

    @property
    def dense_macs(self) -> int:
        return self.output_elements * conv_macs_per_output(self.in_channels, self.kernel_size**2)


def _vgg_cifar_shapes() -> list[tuple[int, int, int]]:
    """(M, N, size) of VGG-16-CIFAR's HetConv layers (the first, 3-channel one stays standard)."""
    return [(64, 64, 32), (64, 128, 16), (128, 128, 16), (128, 256, 8), (256, 256, 8), (256, 512, 4), (512, 512, 4), (512, 512, 2)]


def _resnet_imagenet_shapes() -> list[tuple[int, int, int, int]]:
    """(M, N, input size, stride) of the 3x3 convolutions of ResNet-18/34 at 224x224 (the
    stride-2 ones open stages 2-4; ResNet-50's 3x3 convolutions have the same shapes at
    64-512 channels). The 7x7 stem and the 1x1 convolutions stay standard."""
    return [(64, 64, 56, 1), (64, 128, 56, 2), (128, 128, 28, 1), (128, 256, 28, 2), (256, 256, 14, 1),
            (256, 512, 14, 2), (512, 512, 7, 1)]


def layer_grid(name: str, batch: int, ps: Sequence[int] | None = None) -> list[LayerConfig]:
    """The configurations of a named grid (``ps`` overrides its parts P)."""
    if name == "tiny":
        return [LayerConfig(8, 8, 6, p, batch) for p in ps or (2, 4) if 8 % p == 0]
    if name == "vgg":
        return [LayerConfig(m, n, s, p, batch) for m, n, s in _vgg_cifar_shapes() for p in ps or (2, 4, 8, 16)]
    if name == "resnet18":
        return [LayerConfig(m, n, s, p, batch, stride=st) for m, n, s, st in _resnet_imagenet_shapes() for p in ps or (4, 8)]
    if name == "wide":
        return [LayerConfig(c, c, s, p, batch) for c, s in ((256, 14), (512, 7), (1024, 7)) for p in ps or (4, 8, 32)]
    if name == "beyond":  # shapes beyond VGG-16's: MobileNet/ResNet-like widths, 7x7 maps, strided layers
        shapes = [(96, 96, 28, 1), (160, 160, 14, 1), (384, 384, 7, 1), (512, 512, 7, 1), (128, 128, 32, 2), (256, 256, 14, 2)]
        return [LayerConfig(m, m, s, p, batch, stride=stride) for m, s, stride in
                ((m, s, st) for m, _, s, st in shapes) for p in ps or (4, 8) if m % p == 0]
    if name == "small":
        return [LayerConfig(c, c, s, p, batch) for c, s in ((8, 32), (16, 32), (32, 16)) for p in ps or (2, 4, 8) if c % p == 0]
    raise ValueError(f"unknown grid {name!r}; choose from {sorted(GRIDS)}")


GRIDS = ("tiny", "vgg", "resnet18", "wide", "small", "beyond")


class _GatheredBaseline(nn.Module):
    """A public form of a HetConv layer that gathers each filter's channels by
    the layer's index tables (a baseline; exact in any layout)."""

    def __init__(self, layer: HetConv2d):
        super().__init__()
        self.layer = layer

    def _tables(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(KxK channel index, 1x1 channel index) of every filter, on ``x``'s device."""
        layer = self.layer
        m, n, p = layer.in_channels, layer.out_channels, layer.p
        return (kxk_channel_index(m, n, p, layer.layout, x.device),
                pointwise_channel_index(m, n, p, layer.layout, x.device))


class PublicLoopHetConv(_GatheredBaseline):
    """The public loop form: for each filter, one KxK conv over its gathered
    KxK channels plus one 1x1 conv over its gathered other channels (2N calls)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        n = layer.out_channels
        kxk, others = self._tables(x)
        pad = layer._padding_pair
        centre = (layer.kernel_size[0] // 2 * layer.dilation[0], layer.kernel_size[1] // 2 * layer.dilation[1])
        outs = []
        for f in range(n):
            out = F.conv2d(x.index_select(1, kxk[f]), layer.weight[f : f + 1], None, layer.stride, pad, layer.dilation)
            if others.shape[1]:
                taps = x.index_select(1, others[f])
                out = out + F.conv2d(
                    taps, layer.pointwise_weight[f : f + 1, :, None, None], None, layer.stride,
                    (pad[0] - centre[0], pad[1] - centre[1]),
                )
            outs.append(out)
        out = torch.cat(outs, 1)
        return out if layer.bias is None else out + layer.bias.view(1, -1, 1, 1)


class PBranchHetConv(_GatheredBaseline):
    """The P-branch form of public implementations (once leanconv's ``loop``
    backend): per group, a KxK conv of the group's channels plus a 1x1 conv of
    the other channels' centre taps, the outputs gathered back into filter order
    (2P library calls and gathers; exactly HetConv's MACs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        n, p = layer.out_channels, layer.p
        kxk, others = self._tables(x)
        ng = n // p
        order = group_filter_order_list(n, p, layer.layout)
        filters = [order[g * ng: (g + 1) * ng] for g in range(p)]
        taps = centre_taps(x, layer.kernel_size, layer.stride, layer._padding_pair, layer.dilation)
        outs, order = [], []
        for group in filters:
            index = torch.tensor(group, device=x.device)
            out = F.conv2d(x.index_select(1, kxk[group[0]]), layer.weight.index_select(0, index), None,
                           layer.stride, layer._padding_pair, layer.dilation)
            if others.shape[1]:
                out = out + F.conv2d(taps.index_select(1, others[group[0]]),
                                     layer.pointwise_weight.index_select(0, index)[:, :, None, None])
            outs.append(out)
            order += group
        out = torch.cat(outs, 1).index_select(1, torch.argsort(torch.tensor(order, device=x.device)))
        return out if layer.bias is None else out + layer.bias.view(1, -1, 1, 1)


def _gate(candidate: torch.Tensor, reference: torch.Tensor, tolerance: float) -> float:
    scale = max(1.0, reference.abs().max().item())
    return (candidate - reference).abs().max().item() / scale


def _runner(module: nn.Module, x: torch.Tensor, mode: str, grad: torch.Tensor | None) -> Callable[[], object]:
    if mode == "infer":
        def run():
            with torch.no_grad():
                return module(x)
        return run
    leaves = [x] + [t for t in module.parameters() if t.requires_grad]

    def run():
        out = module(x)
        return torch.autograd.grad(out, leaves, grad)
    return run


def _row(config, mode, fmt, name, timing: Timing | None, macs, dense_macs, baseline: Timing | None, error, extra=None):
    row = {
        "config": str(config), "M": config.in_channels, "N": config.out_channels, "size": config.size,
        "P": config.p, "batch": config.batch, "mode": mode, "format": fmt, "candidate": name,
        "gate_error": error, "gate": "n/a" if error is None else "pass" if timing is not None else "FAIL",
        "macs": macs, "mac_ratio": macs / dense_macs,
    }
    if timing is not None:
        row.update(
            median_ms=timing.median * 1e3, min_ms=timing.minimum * 1e3, max_ms=timing.maximum * 1e3,
            spread=timing.spread, gmacs=macs / timing.median / 1e9,
        )
        if baseline is not None:
            speedup = baseline.median / timing.median
            row["speedup_vs_conv2d"] = speedup
            row["fraction_of_mac_ratio"] = speedup * macs / dense_macs
    row.update(extra or {})
    return row


class _Measuring(nn.Module):
    """``auto`` with measuring turned on for its calls (``hetconv:auto-measured``):
    the opt-in measuring choice, timed beside the deterministic rule's."""

    def __init__(self, layer: HetConv2d) -> None:
        super().__init__()
        self.layer = layer

    @property
    def last_backend(self) -> str | None:
        return self.layer.last_backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with leanconv_config.benchmarking():
            return self.layer(x)


def bench_hetconv_config(
    config: LayerConfig,
    *,
    modes: Sequence[str] = ("infer", "train"),
    formats: Sequence[str] = ("channels_last", "contiguous"),
    backends: Sequence[str] = ("auto", "auto-measured", "reference", "split"),
    baselines: Sequence[str] = ("seed", "p_branch", "public_loop"),
    warmup: int = 2,
    repeats: int = 7,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> list[dict]:
    """Rows for one configuration: every mode x format x candidate."""
    torch.manual_seed(seed)
    pad = config.kernel_size // 2
    het = HetConv2d(config.in_channels, config.out_channels, config.kernel_size, config.stride, pad, p=config.p)
    conv = het.to_conv2d()
    dense = config.dense_macs
    own = config.output_elements * hetconv_macs_per_output(config.in_channels, config.kernel_size**2, config.p)
    rows = []
    for fmt in formats:
        memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        x0 = torch.randn(config.batch, config.in_channels, config.size, config.size).contiguous(memory_format=memory_format)
        for mode in modes:
            x = x0.detach().requires_grad_(mode == "train")
            modules: dict[str, tuple[nn.Module, int]] = {"conv2d": (conv, dense)}
            for backend in backends:
                measured = backend == "auto-measured"
                layer = HetConv2d(**het._same_arguments(backend="auto" if measured else backend))
                layer.load_state_dict(het.state_dict())
                modules[f"hetconv:{backend}"] = (_Measuring(layer) if measured else layer, own)
            if "seed" in baselines and config.p > 1:
                seed_layer = ApproximateHetConv2d.from_hetconv(het)
                modules["seed"] = (seed_layer, config.batch * layer_macs(seed_layer, (config.size, config.size))[0])
            if "p_branch" in baselines and config.p > 1:
                modules["p_branch"] = (PBranchHetConv(het), own)
            if "public_loop" in baselines and config.p > 1 and config.out_channels <= 512 and mode == "infer":
                modules["public_loop"] = (PublicLoopHetConv(het), own)
            for module, _ in modules.values():
                module.to(memory_format=memory_format)
            with torch.no_grad():
                reference = conv(x)
            grad = torch.randn_like(reference) if mode == "train" else None
            runners, errors = {}, {}
            for name, (module, _) in modules.items():
                with torch.no_grad():
                    errors[name] = _gate(module(x), reference, tolerance)
                if errors[name] <= tolerance:
                    runners[name] = _runner(module, x, mode, grad)
            slow = {k: v for k, v in runners.items() if k == "public_loop"}
            fast = {k: v for k, v in runners.items() if k != "public_loop"}
            timings = time_interleaved(fast, warmup=warmup, repeats=repeats)
            if slow:
                timings.update(time_interleaved(slow, warmup=1, repeats=min(2, repeats)))
            for name, (module, macs) in modules.items():
                extra = {}
                if isinstance(module, (HetConv2d, _Measuring)):
                    extra["ran"] = module.last_backend
                rows.append(_row(config, mode, fmt, name, timings.get(name), macs, dense, timings.get("conv2d"), errors[name], extra))
    return rows


def bench_layer_grid(configs: Iterable[LayerConfig], progress: Callable[[str], None] | None = None, **kwargs) -> list[dict]:
    rows = []
    for config in configs:
        if progress:
            progress(str(config))
        rows.extend(bench_hetconv_config(config, **kwargs))
    return rows


def bench_separable_config(
    in_channels: int, out_channels: int, size: int, batch: int, *, modes=("infer", "train"),
    formats=("channels_last", "contiguous"), warmup: int = 2, repeats: int = 7, seed: int = 0,
) -> list[dict]:
    """DSC and BSConv-U/S (3x3, stride 1) against nn.Conv2d at one shape."""
    torch.manual_seed(seed)
    k = 3
    conv = nn.Conv2d(in_channels, out_channels, k, padding=1)
    modules = {"conv2d": conv, "dsc": DSConv2d(in_channels, out_channels, k, padding=1),
               "bsconv_u": BSConvU2d(in_channels, out_channels, k, padding=1),
               "bsconv_s": BSConvS2d(in_channels, out_channels, k, padding=1)}
    layers = {name: (module, batch * layer_macs(module, (size, size))[0]) for name, module in modules.items()}
    dense = layers["conv2d"][1]
    rows = []
    config = LayerConfig(in_channels, out_channels, size, 1, batch)
    for fmt in formats:
        memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        x0 = torch.randn(batch, in_channels, size, size).contiguous(memory_format=memory_format)
        for mode in modes:
            x = x0.detach().requires_grad_(mode == "train")
            grad = torch.randn(batch, out_channels, size, size) if mode == "train" else None
            runners = {}
            for name, (module, _) in layers.items():
                module.to(memory_format=memory_format).train(mode == "train")
                runners[name] = _runner(module, x, mode, grad)
            timings = time_interleaved(runners, warmup=warmup, repeats=repeats)
            for name, (module, macs) in layers.items():
                row = _row(config, mode, fmt, name, timings[name], macs, dense, timings["conv2d"], None)
                row["P"] = None
                rows.append(row)
    return rows

