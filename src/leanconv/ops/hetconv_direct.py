"""The ``direct`` HetConv backend: a C++ CPU kernel that computes both parts of
HetConv in one pass (:file:`leanconv/kernels/hetconv_direct.h` and the files beside it).

HetConv (Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120). The library
forms of it (``split``: a grouped KxK convolution plus a 1x1 convolution) lose
half their speed at 8-32 channels per group, where no library primitive is
efficient. The kernel splits the sum by tap: the centre tap is one dense 1x1 over
every channel (the 1x1 kernels, and each group's own channels the centre of its
KxK kernels), the other taps a grouped convolution; both accumulate in the same
registers, over a block of output pixels x one or two vectors of filters, then
bias and an optional ReLU, then one store. No product by a structural zero is
computed except in the lanes of a vector shared by groups of fewer filters than
the vector is wide (:func:`pass_plan`).

* **Build.** Compiled on first use with ``torch.utils.cpp_extension`` (the C++
  compiler already on the machine and ``ninja``) and cached by torch
  (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). One build
  holds the kernel for each x86 vector ISA (AVX-512, AVX2) and a portable one,
  each compiled for its ISA only; the rest targets the baseline, so a build (or a
  build cache shared between hosts) runs on any CPU of its architecture. ``make
  test`` and ``make demo`` build it during set-up. Where it cannot be built, one
  warning says why and ``auto`` keeps the library forms; ``LEANCONV_DIRECT=0``
  turns it off.
* **ISA** (:func:`active_isa`): the widest the CPU runs, no wider than torch's own
  CPU capability (``torch.backends.cpu.get_cpu_capability()``, which
  ``ATEN_CPU_CAPABILITY`` narrows, as it does for PyTorch's kernels), or
  ``LEANCONV_CPU_ISA`` (``avx512``, ``avx2``, ``portable``). Weights are packed for
  one ISA's vector width; the kernel refuses, with a clear error, an ISA the CPU
  lacks.
* **Inference** (cached by the layer): weights packed into filter tiles
  (:func:`pack`).
* **Torch ops** (``torch.ops.leanconv.hetconv_direct*``, below): the kernel registered with
  fake implementations and autograd, so compiled and exported graphs keep it.
* **Training** (``hetconv_direct`` and its backward op): the forward pass is the kernel; the input
  gradient of a stride-1 layer is the same kernel run on the output gradient with
  the transposed, flipped HetConv (:func:`transposed_parameters`: a HetConv's
  transpose is a HetConv of the same P and layout); strided layers take the
  dense weight's input gradient; the weight gradients are one grouped-convolution
  weight gradient and one GEMM.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .conv_geometry import HetConvGeometry, centre_taps, conv_output_size, reads_input_directly
from .hetconv_layout import (
    group_channel_order, group_filter_order, group_filter_order_list, kxk_channel_index, materialize_dense_weight, pointwise_channel_index,
)
from .hetconv_split import prepare_split, run_split, zero_diagonal_pointwise
from .registry import under_dispatch_mode

__all__ = ["DirectWeights", "available", "unavailable_reason", "load", "active_isa", "runnable_isas", "lanes", "pack", "transposed_parameters", "prepare_direct", "run_direct"]

KERNELS = Path(__file__).resolve().parent.parent / "kernels"
SOURCES = [KERNELS / f"hetconv_direct{part}.cpp" for part in ("", "_avx512", "_avx2", "_portable")]
ISAS = ("avx512", "avx2", "portable")  # widest first
_CL = torch.channels_last
_lock = threading.Lock()
_state: dict[str, object] = {}


def _extension_name() -> str:
    import platform

    return f"leanconv_hetconv_direct_{platform.machine().lower() or 'cpu'}"


# No -march=native: each ISA's file sets its own target (the build must run on any CPU of
# its architecture). -ffp-contract=fast lets the compiler fuse a product and a sum into one
# FMA, which ISO C++ mode would otherwise forbid.
FLAGS = ["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=fast"]


def load():
    """The compiled extension (built on the first call, then cached by torch), or
    None where it cannot be built; the reason is :func:`unavailable_reason`."""
    if "module" in _state or "error" in _state:
        return _state.get("module")
    with _lock:
        if "module" in _state or "error" in _state:
            return _state.get("module")
        if os.environ.get("LEANCONV_DIRECT", "1") == "0":
            _state["error"] = "turned off by LEANCONV_DIRECT=0"
            return None
        try:
            from torch.utils import cpp_extension

            if not _built_before(cpp_extension):
                print("leanconv: building the 'direct' HetConv CPU kernel (once per machine, about 30 s)",
                      file=sys.stderr, flush=True)
            module = cpp_extension.load(
                name=_extension_name(), sources=[str(source) for source in SOURCES], extra_cflags=FLAGS,
                extra_ldflags=["-fopenmp"], extra_include_paths=[str(KERNELS)],
                verbose=False,
            )
        except Exception as error:  # no compiler, no ninja, a failed build: the library forms remain
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            _state["error"] = f"the C++ kernel could not be built ({type(error).__name__}: {first_line})"
            warnings.warn(f"leanconv: the 'direct' HetConv backend is unavailable: {_state['error']}; "
                          "HetConv layers use the library forms", RuntimeWarning, stacklevel=2)
            return None
        _state["runnable"] = tuple(module.runnable_isas())
        _state["lanes"] = {isa: int(module.lanes(isa)) for isa in _state["runnable"]}
        _state["module"] = module
    # Chosen now, eagerly (load runs in the backends' setup, outside any traced graph):
    # torch.compile cannot trace torch.backends.cpu.get_cpu_capability() in a first call.
    active_isa()
    return module


def _built_before(cpp_extension) -> bool:
    try:  # torch's cache folder for this extension (a private helper: any failure means "unknown")
        folder = cpp_extension._get_build_directory(_extension_name(), verbose=False)
        return (Path(folder) / f"{_extension_name()}.so").exists()
    except Exception:  # noqa: BLE001
        return False


def unavailable_reason() -> str | None:
    """None once the extension is loaded; else why it is not (after :func:`load` tried)."""
    return None if "module" in _state else _state.get("error", "not built yet")  # type: ignore[return-value]


def available() -> bool:
    """Whether the kernel is built or can be (builds it on the first call)."""
    return load() is not None


def runnable_isas() -> tuple[str, ...]:
    """The ISAs whose kernel this CPU runs, widest first (empty where the kernel is unavailable)."""
    return _state.get("runnable", ()) if load() is not None else ()  # type: ignore[return-value]


def active_isa() -> str:
    """The ISA the layers' calls use (module docstring): ``LEANCONV_CPU_ISA`` where set,
    else the widest this CPU runs that torch's CPU capability allows."""
    if "active" in _state:
        return _state["active"]  # type: ignore[return-value]
    runnable = runnable_isas()
    if not runnable:
        raise RuntimeError(f"the direct HetConv kernel is unavailable: {unavailable_reason()}")
    chosen = os.environ.get("LEANCONV_CPU_ISA", "").strip().lower()
    if chosen:
        if chosen not in ISAS:
            raise ValueError(f"LEANCONV_CPU_ISA must be one of {', '.join(ISAS)}, got {chosen!r}")
        if chosen not in runnable:
            raise ValueError(f"LEANCONV_CPU_ISA={chosen!r}, but this CPU runs only {', '.join(runnable)}")
    else:
        capability = torch.backends.cpu.get_cpu_capability().upper()  # DEFAULT, AVX2, AVX512, ...
        allowed = ISAS if capability.startswith("AVX512") else ISAS[1:] if capability.startswith("AVX2") else ISAS[2:]
        chosen = next(isa for isa in runnable if isa in allowed)
    _state["active"] = chosen  # read once: packed weights and plans assume one ISA per process
    return chosen


def lanes(isa: str) -> int:
    """Floats per vector register of ``isa``'s kernel (16, 8, 4)."""
    return _state["lanes"][_runnable(isa)]


def tile_width(out_channels: int, isa: str) -> int:
    """Filters per register tile (one vector of ``isa``, or two): the kernel's own rule
    (``tile_width`` in the C++ source), as a Python int that tracing sees as a constant."""
    lanes = _state["lanes"][isa]
    return lanes if out_channels <= lanes else 2 * lanes


# ------------------------------------------------------------------------------ packing
@dataclass(frozen=True)
class DirectWeights:
    """The kernel's operands, filters in group order (group g's filters in their order,
    then group g+1's) cut into tiles of FT (one or two vector widths, zero-padded):

    * ``centre`` (T, M, FT): the centre tap over every input channel: the 1x1
      kernels, and on each group's own channels the centre of its KxK kernels;
    * ``others`` (passes, kh*kw - 1, M/P, FT): the other taps of the KxK kernels,
      one pass per group of each of a tile's vectors (:func:`pass_plan`), zero in
      lanes of other groups;
    * ``pass_groups`` (passes, 2) int32 and ``tile_passes`` (T + 1,) int32: the
      plan of :func:`pass_plan`;
    * ``lane_offsets`` (T*V*M/P,) and ``lane_index`` (T*V*M/P*lanes,) int32: the
      permuted loads of :func:`lane_plan_lists` where a vector holds several groups
      (empty otherwise).

    ``isa``: the ISA whose vector width the tiles have (:func:`active_isa`).
    The bias is passed per call, in filter order. ``params``: the layer's own
    ``(weight, pointwise_weight)``, which a call under a torch dispatch mode runs in
    the split form (``FlopCounterMode`` and the like do not see C++ calls)."""

    centre: torch.Tensor
    others: torch.Tensor
    pass_groups: torch.Tensor
    tile_passes: torch.Tensor
    lane_offsets: torch.Tensor
    lane_index: torch.Tensor
    isa: str
    params: tuple = ()


@functools.lru_cache(maxsize=256)
def pass_plan(in_channels: int, out_channels: int, p: int, tile: int, lanes: int, layout: str, lane_loads: bool = True):
    """:func:`pass_plan_lists` as tensors (see there)."""
    groups, firsts, lane_filter = pass_plan_lists(in_channels, out_channels, p, tile, lanes, layout, lane_loads)
    return (
        torch.tensor(groups, dtype=torch.int32).reshape(-1, 2),
        torch.tensor(firsts, dtype=torch.int32),
        None if lane_filter is None else torch.tensor(lane_filter, dtype=torch.long),
    )


@functools.lru_cache(maxsize=256)
def pass_plan_lists(in_channels: int, out_channels: int, p: int, tile: int, lanes: int, layout: str,
                    lane_loads: bool = True):
    """How the kernel runs the grouped taps of each filter tile.

    A tile holds ``tile`` consecutive filters in group order, as ``tile // lanes``
    vectors (one or two). A pass gives each vector at most one group; the kernel
    reads that group's channels for it. Where both vectors hold the same group the
    pass shares its input values between them; a group whose filters fill one
    vector is paired with the next vector's group, so two groups run together.

    Returns (as Python tuples; :func:`pass_plan` makes them tensors) ``pass_groups``
    (passes, 2) int32: the group of vector 0 and of vector 1
    (-1: none; a one-vector tile repeats its group); ``tile_passes`` (T + 1,) int32:
    tile t's passes are ``tile_passes[t]`` to ``tile_passes[t + 1] - 1``; and
    ``lane_filter`` (passes * tile,) int64: the filter (in the layer's order) whose
    weights each lane of each pass holds, ``out_channels`` for a zero lane; None where
    that is every filter in order (one pass per tile, no zero lane, blocked layout).

    Where :func:`lane_plan_lists` applies (vectors of several groups) and ``lane_loads``,
    each tile runs one pass whose lanes hold every filter of the tile, in group order."""
    per_group = out_channels // p
    tiles = -(-out_channels // tile)
    vectors = tile // lanes

    filter_of = group_filter_order_list(out_channels, p, layout)  # group order -> filter (Python ints: no tensor)
    if lane_loads and lane_plan_lists(in_channels, out_channels, p, tile, lanes, layout) is not None:  # one pass
        lane_filter = [filter_of[q] if q < out_channels else out_channels for q in range(tiles * tile)]
        identity = lane_filter == list(range(out_channels))
        return ((-1, -1),) * tiles, tuple(range(tiles + 1)), None if identity else tuple(lane_filter)

    groups: list[tuple[int, int]] = []
    firsts = [0]
    lane_filter: list[int] = []
    for t in range(tiles):
        in_vector = []  # the groups of each vector, in order
        for v in range(vectors):
            start = t * tile + v * lanes
            in_vector.append(sorted({q // per_group for q in range(start, min(start + lanes, out_channels))}))
        if vectors == 1:
            passes = [(g, g) for g in in_vector[0]]
        else:
            first, second = in_vector
            passes = []
            if first and second and first[-1] == second[0]:  # one group across both vectors
                passes.append((first[-1], first[-1]))
                first, second = first[:-1], second[1:]
            for k in range(max(len(first), len(second))):
                passes.append((first[k] if k < len(first) else -1, second[k] if k < len(second) else -1))
        for g0, g1 in passes:
            for f in range(tile):
                q = t * tile + f
                group = g0 if f < lanes else g1
                lane_filter.append(filter_of[q] if q < out_channels and q // per_group == group else out_channels)
            groups.append((g0, g1))
        firsts.append(len(groups))
    identity = lane_filter == list(range(out_channels))
    return tuple(groups), tuple(firsts), None if identity else tuple(lane_filter)


@functools.lru_cache(maxsize=256)
def lane_plan_lists(in_channels: int, out_channels: int, p: int, tile: int, lanes: int, layout: str):
    """Where a vector holds filters of several groups (a group has fewer filters than a
    vector has lanes), its grouped taps run as one pass with every lane in use: for the
    j-th channel of the groups, each pixel's input vector is loaded from one channel
    offset and permuted so that lane f holds channel j of filter f's group. This needs
    the channels a vector reads at each j within one vector's width (always so in the
    shifted layout, where channel j of groups g..g' are g + jP..g' + jP; in the blocked
    layout where the vector's groups span at most ``lanes`` channels) and at least
    ``lanes`` input channels (a load never runs past a pixel's channels).

    Returns None where it does not apply, else ``(offsets, index)`` as Python tuples:
    ``offsets`` (T * V * Mg,): the channel each (tile, vector, j) loads from, ``index``
    (T * V * Mg * lanes,): the lane of that load each lane takes (0 for a lane past the
    last filter, whose weights are zero)."""
    per_group, mg = out_channels // p, in_channels // p
    if per_group >= lanes or in_channels < lanes or p == 1:
        return None
    tiles, vectors = -(-out_channels // tile), tile // lanes
    offsets: list[int] = []
    index: list[int] = []
    for t in range(tiles):
        for v in range(vectors):
            first = t * tile + v * lanes
            groups = [q // per_group if q < out_channels else None for q in range(first, first + lanes)]
            for j in range(mg):
                channels = [None if g is None else (g * mg + j if layout == "blocked" else j * p + g) for g in groups]
                real = [c for c in channels if c is not None]
                if real and max(real) - min(real) >= lanes:
                    return None
                offset = min(min(real, default=0), in_channels - lanes)
                offsets.append(offset)
                index.extend(0 if c is None else c - offset for c in channels)
    return tuple(offsets), tuple(index)


def pack(weight, pointwise_weight, in_channels: int, p: int, layout: str, isa: str | None = None,
         lane_loads: bool = True) -> DirectWeights:
    """Pack ``weight`` (N, M/P, kh, kw) and ``pointwise_weight`` (N, M - M/P) for the
    kernel of ``isa`` (default :func:`active_isa`; float32, detached). Training packs on
    every call, so this is a handful of copies: the centre matrix, one gather and one tap
    selection. ``lane_loads=False`` keeps one pass per group even where a vector holds
    several (:func:`lane_plan_lists`): the same function, for tests and benchmarks."""
    isa = _runnable(isa)
    weight, pointwise_weight = weight.detach().float(), pointwise_weight.detach().float()
    out_channels, per_group, kh, kw = weight.shape
    device = weight.device
    tile = tile_width(out_channels, isa)
    tiles = -(-out_channels // tile)
    taps = weight.reshape(out_channels, per_group, kh * kw)
    centre_tap = (kh // 2) * kw + kw // 2
    rows = torch.arange(out_channels, device=device)[:, None].expand(out_channels, per_group)
    centre = zero_diagonal_pointwise(pointwise_weight, in_channels, out_channels, p, layout).index_put_(
        (rows, kxk_channel_index(in_channels, out_channels, p, layout, device)), taps[:, :, centre_tap])
    if layout == "shifted":  # rows in group order
        centre = centre.index_select(0, group_filter_order(in_channels, out_channels, p, layout, device))
    centre = torch.nn.functional.pad(centre, (0, 0, 0, tiles * tile - out_channels))
    centre = centre.view(tiles, tile, in_channels).transpose(1, 2).contiguous()
    pass_groups, tile_passes, lane_filter = pass_plan(in_channels, out_channels, p, tile, _state["lanes"][isa], layout,
                                                      lane_loads)
    if lane_filter is None:
        lanes = taps.view(tiles, tile, per_group, kh * kw)
    else:
        padded = torch.nn.functional.pad(taps, (0, 0, 0, 0, 0, 1))  # filter N: a zero lane
        lanes = padded.index_select(0, lane_filter.to(device)).view(-1, tile, per_group, kh * kw)
    others = [tap for tap in range(kh * kw) if tap != centre_tap]
    others = lanes.permute(0, 3, 2, 1).index_select(1, torch.tensor(others, dtype=torch.long, device=device)).contiguous()
    lane_offsets, lane_index = _lane_tensors(in_channels, out_channels, p, tile, _state["lanes"][isa], layout,
                                             lane_loads)
    return DirectWeights(centre, others, pass_groups, tile_passes, lane_offsets, lane_index, isa)


@functools.lru_cache(maxsize=256)
def _lane_tensors(in_channels: int, out_channels: int, p: int, tile: int, lanes: int, layout: str,
                  lane_loads: bool = True):
    """:func:`lane_plan_lists` as int32 tensors; empty ones where it does not apply."""
    plan = lane_plan_lists(in_channels, out_channels, p, tile, lanes, layout) if lane_loads else None
    offsets, index = ((), ()) if plan is None else plan
    return torch.tensor(offsets, dtype=torch.int32), torch.tensor(index, dtype=torch.int32)


# An NCHW input takes permuted loads (through the kernel's channels-last copies) only where a
# vector holds at least this many groups; with two, one pass per group read in place was
# 1.2-1.3x faster (benchmarks/direct_internals.py, rows lane_loads: passes_over_lanes_nchw
# 0.75-0.85 at 2 groups a vector, 1.3 at 4).
NCHW_LANE_LOADS_MIN_GROUPS = 4


def lane_loads_pay(channels_last: bool, out_channels: int, p: int) -> bool:
    """Whether a call on a channels-last (else NCHW) input packs permuted loads where they
    apply: always for channels-last inputs; for NCHW ones where a vector of the active ISA
    holds at least :data:`NCHW_LANE_LOADS_MIN_GROUPS` groups."""
    return channels_last or _state["lanes"][active_isa()] >= NCHW_LANE_LOADS_MIN_GROUPS * (out_channels // p)


def _runnable(isa: str | None) -> str:
    """``isa``, checked against what this CPU runs, or :func:`active_isa`."""
    if isa is None:
        return active_isa()
    if isa not in runnable_isas():
        raise ValueError(f"isa must be one this CPU runs ({', '.join(runnable_isas()) or 'none: the kernel is unavailable'}), "
                         f"got {isa!r}")
    return isa


def transposed_parameters(weight, pointwise_weight, in_channels: int, p: int, layout: str):
    """The HetConv whose stride-1 convolution is this layer's input gradient: in and
    out channels swapped, kernels flipped, the same P and layout. Returns its
    ``(weight (M, N/P, kh, kw), pointwise_weight (M, N - N/P))``."""
    out_channels, per_group = weight.shape[:2]
    ng = out_channels // p
    if layout == "blocked":  # channel g*Mg + j gets filters g*Ng + i
        kxk = weight.reshape(p, ng, per_group, *weight.shape[2:]).transpose(1, 2)
    else:  # channel j*P + r gets filters q*P + r
        kxk = weight.reshape(ng, p, per_group, *weight.shape[2:]).permute(2, 1, 0, 3, 4)
    kxk = kxk.reshape(in_channels, ng, *weight.shape[2:]).flip(-1, -2)
    matrix = zero_diagonal_pointwise(pointwise_weight, in_channels, out_channels, p, layout).t()
    index = pointwise_channel_index(out_channels, in_channels, p, layout, matrix.device)
    return kxk, matrix.gather(1, index)


def _either_format(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself where the kernel reads it (channels-last or contiguous), else a
    contiguous copy."""
    return t if t.is_contiguous(memory_format=_CL) or t.is_contiguous() else t.contiguous()


def _call(x: torch.Tensor, w: DirectWeights, bias, geometry: HetConvGeometry, relu: bool = False) -> torch.Tensor:
    """The kernel on packed weights, called directly (eager mode: no dispatcher on the
    path; graphs call the same C++ function as the op ``leanconv::hetconv_direct_packed``)."""
    g = geometry
    return load().forward(
        _either_format(x), w.centre, w.others, w.pass_groups, w.tile_passes, w.lane_offsets, w.lane_index,
        None if bias is None else bias.detach(),
        g.out_channels, list(g.kernel_size), list(g.stride), list(g.padding), list(g.dilation), g.p, g.layout == "shifted",
        relu, w.isa,
    )


def _transposed_geometry(g: HetConvGeometry) -> HetConvGeometry | None:
    """The geometry of the input gradient as a forward HetConv, where it is one:
    stride 1 and padding at most dilation*(kernel-1) on each side."""
    if g.stride != (1, 1):
        return None
    padding = tuple(d * (k - 1) - pad for k, pad, d in zip(g.kernel_size, g.padding, g.dilation))
    if min(padding) < 0:
        return None
    return HetConvGeometry(g.out_channels, g.in_channels, g.kernel_size, (1, 1), padding, g.dilation, g.p, g.layout)


# ------------------------------------------------------------------ registered torch ops
# The kernel as torch ops (``torch.ops.leanconv.*``), with fake implementations and autograd,
# so that torch.compile and torch.export keep it in their graphs (ONNX export, which needs
# standard operators, gets the split form from the dispatcher's rule):
#
# * ``hetconv_direct_pack(weight, pointwise_weight, in_channels, p, layout)``: :func:`pack`'s
#   operands; under inductor's freezing it is folded into constants with the weights;
# * ``hetconv_direct_packed(x, centre, others, pass_groups, tile_passes, lane_offsets, lane_index, bias, ...)``: the
#   kernel on packed operands (inference);
# * ``hetconv_direct(x, weight, pointwise_weight, bias, ...)``: HetConv on the layer's own
#   parameters, differentiable; its gradients are ``hetconv_direct_backward``.


def _geometry(x_channels: int, weight: torch.Tensor, kernel_size, stride, padding, dilation, p: int, layout: str):
    return HetConvGeometry(x_channels, weight.shape[0], tuple(kernel_size), tuple(stride), tuple(padding),
                           tuple(dilation), p, layout)


def _output_like(x: torch.Tensor, out_channels: int, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """An empty output in the kernel's format: channels-last where ``x`` is, else contiguous."""
    sizes = [max(0, conv_output_size(x.shape[2 + d], kernel_size[d], stride[d], padding[d], dilation[d])) for d in (0, 1)]
    fmt = _CL if x.is_contiguous(memory_format=_CL) else torch.contiguous_format
    return torch.empty((x.shape[0], out_channels, *sizes), dtype=x.dtype, device=x.device, memory_format=fmt)


@torch.library.custom_op("leanconv::hetconv_direct_pack", mutates_args=())
def _pack_op(weight: torch.Tensor, pointwise_weight: torch.Tensor, in_channels: int, p: int,
             layout: str, isa: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor]:
    packed = pack(weight, pointwise_weight, in_channels, p, layout, isa)
    return (packed.centre, packed.others, packed.pass_groups.clone(), packed.tile_passes.clone(),
            packed.lane_offsets.clone(), packed.lane_index.clone())


@_pack_op.register_fake
def _(weight, pointwise_weight, in_channels, p, layout, isa):
    isa = _runnable(isa)
    out_channels, per_group, kh, kw = (int(d) for d in weight.shape)  # a layer's channels are static
    tile = tile_width(out_channels, isa)
    tiles = -(-out_channels // tile)
    passes = len(pass_plan_lists(in_channels, out_channels, p, tile, _state["lanes"][isa], layout)[0])
    lane_offsets, lane_index = _lane_tensors(in_channels, out_channels, p, tile, _state["lanes"][isa], layout)
    return (weight.new_empty(tiles, in_channels, tile), weight.new_empty(passes, kh * kw - 1, per_group, tile),
            weight.new_empty(passes, 2, dtype=torch.int32), weight.new_empty(tiles + 1, dtype=torch.int32),
            weight.new_empty(lane_offsets.shape, dtype=torch.int32), weight.new_empty(lane_index.shape, dtype=torch.int32))


# Defined here, implemented for the CPU in C++ (``TORCH_LIBRARY_IMPL`` in the kernel's source,
# registered when the extension loads): a dispatcher call, not a Python one.
torch.library.define(
    "leanconv::hetconv_direct_packed",
    "(Tensor x, Tensor centre, Tensor others, Tensor pass_groups, Tensor tile_passes, Tensor lane_offsets, "
    "Tensor lane_index, Tensor? bias, int out_channels, "
    "int[] kernel_size, int[] stride, int[] padding, int[] dilation, int p, str layout, bool relu, str isa) -> Tensor",
)


# The direct depthwise-separable kernel of the same extension (leanconv.ops.separable_direct
# packs its weights and calls it); defined here, before the extension that implements it loads.
torch.library.define(
    "leanconv::separable_direct_packed",
    "(Tensor x, Tensor depthwise, Tensor pointwise, Tensor pointwise_bias, Tensor depthwise_bias, "
    "Tensor? first_pointwise, Tensor? first_pointwise_bias, int out_channels, int[] kernel_size, int[] stride, "
    "int[] padding, int[] dilation, bool pointwise_first, bool relu, str isa) -> Tensor",
)


@torch.library.register_fake("leanconv::separable_direct_packed")
def _(x, depthwise, pointwise, pointwise_bias, depthwise_bias, first_pointwise, first_pointwise_bias, out_channels,
      kernel_size, stride, padding, dilation, pointwise_first, relu, isa):
    return _output_like(x, out_channels, kernel_size, stride, padding, dilation)


@torch.library.register_fake("leanconv::hetconv_direct_packed")
def _(x, centre, others, pass_groups, tile_passes, lane_offsets, lane_index, bias, out_channels, kernel_size, stride,
      padding, dilation, p, layout, relu, isa):
    return _output_like(x, out_channels, kernel_size, stride, padding, dilation)


@torch.library.custom_op("leanconv::hetconv_direct", mutates_args=())
def _direct_op(x: torch.Tensor, weight: torch.Tensor, pointwise_weight: torch.Tensor, bias: torch.Tensor | None,
               kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int], p: int,
               layout: str) -> torch.Tensor:
    g = _geometry(x.shape[1], weight, kernel_size, stride, padding, dilation, p, layout)
    return _call(x, pack(weight, pointwise_weight, g.in_channels, p, layout,
                         lane_loads=lane_loads_pay(x.is_contiguous(memory_format=_CL), g.out_channels, p)), bias, g)


@_direct_op.register_fake
def _(x, weight, pointwise_weight, bias, kernel_size, stride, padding, dilation, p, layout):
    return _output_like(x, weight.shape[0], kernel_size, stride, padding, dilation)


@torch.library.custom_op("leanconv::hetconv_direct_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, pointwise_weight: torch.Tensor,
                 kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int], p: int,
                 layout: str, output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _geometry(x.shape[1], weight, kernel_size, stride, padding, dilation, p, layout)
    grad_x, grad_weight, grad_pointwise = _gradients(grad_out, x, weight, pointwise_weight, g, output_mask)
    # Strides the fake implementation can state: the input gradient in the input's format,
    # the weight gradients contiguous; a custom op returns no undefined tensors, so
    # gradients not asked for are empty.
    fmt = _CL if x.is_contiguous(memory_format=_CL) else torch.contiguous_format
    return (x.new_empty(0) if grad_x is None else grad_x.contiguous(memory_format=fmt),
            x.new_empty(0) if grad_weight is None else grad_weight.contiguous(),
            x.new_empty(0) if grad_pointwise is None else grad_pointwise.contiguous())


@_backward_op.register_fake
def _(grad_out, x, weight, pointwise_weight, kernel_size, stride, padding, dilation, p, layout, output_mask):
    fmt = _CL if x.is_contiguous(memory_format=_CL) else torch.contiguous_format
    need_x, need_weight, need_pointwise = output_mask
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt) if need_x else x.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else x.new_empty(0),
            pointwise_weight.new_empty(pointwise_weight.shape) if need_pointwise else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, pointwise_weight, bias, *arguments = inputs
    ctx.arguments = arguments
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, pointwise_weight)


def _backward(ctx, grad_out):
    x, weight, pointwise_weight = ctx.saved_tensors
    mask = [bool(n) for n in ctx.needs_input_grad[:3]]
    grad_x, grad_weight, grad_pointwise = torch.ops.leanconv.hetconv_direct_backward(
        grad_out, x, weight, pointwise_weight, *ctx.arguments, mask)
    grad_bias = grad_out.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return (grad_x if mask[0] else None, grad_weight if mask[1] else None, grad_pointwise if mask[2] else None,
            grad_bias, *([None] * len(ctx.arguments)))


_direct_op.register_autograd(_backward, setup_context=_setup_context)


def _gradients(grad_out, x, weight, pointwise_weight, g: HetConvGeometry, mask):
    """(input, KxK weight, 1x1 weight) gradients of HetConv, those ``mask`` asks for (module docstring)."""
    grad_out = grad_out.contiguous(memory_format=_CL if x.is_contiguous(memory_format=_CL) else torch.contiguous_format)
    grad_x = grad_weight = grad_pointwise = None
    if mask[0]:
        transposed = _transposed_geometry(g)
        if transposed is not None:
            kxk_t, pointwise_t = transposed_parameters(weight, pointwise_weight, g.in_channels, g.p, g.layout)
            lane_loads = lane_loads_pay(grad_out.is_contiguous(memory_format=_CL), g.in_channels, g.p)
            packed = pack(kxk_t, pointwise_t, g.out_channels, g.p, g.layout, lane_loads=lane_loads)
            grad_x = _call(grad_out, packed, None, transposed)
        else:
            dense = materialize_dense_weight(weight, pointwise_weight, g.p, g.layout)
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, dense, None, g.stride, g.padding, g.dilation, False, [0, 0], 1, [True, False, False],
            )[0]
    if (mask[1] or mask[2]) and not x.is_contiguous(memory_format=_CL):
        # NCHW: the weight gradients run on channels-last copies (the kernel's blocked
        # transposition), where oneDNN's grouped weight gradient and the GEMM's operands
        # read channels contiguously (measured: 16 channels, P=4, 32x32, batch 64: 4.9 +
        # 1.7 ms in NCHW, 1.4 + 0.3 ms channels-last, 0.9 ms for the two copies).
        isa = active_isa()
        x, grad_out = load().relayout(x, isa), load().relayout(grad_out, isa)
    if mask[1]:
        grad_weight = _kxk_weight_grad(x, grad_out, weight, g)
    if mask[2]:
        taps = x if reads_input_directly(g.kernel_size, g.stride, g.padding, g.dilation) else centre_taps(
            x, g.kernel_size, g.stride, g.padding, g.dilation)
        flat_grad = grad_out.permute(0, 2, 3, 1).reshape(-1, g.out_channels)
        flat_taps = taps.permute(0, 2, 3, 1).reshape(-1, g.in_channels)
        matrix = flat_grad.t().mm(flat_taps)  # (N, M): every channel; the HetConv's own entries are gathered
        index = pointwise_channel_index(g.in_channels, g.out_channels, g.p, g.layout, matrix.device)
        grad_pointwise = matrix.gather(1, index)
    return grad_x, grad_weight, grad_pointwise


# Output maps up to this many pixels take the KxK weight gradient tap by tap (one batched
# GEMM per tap over the groups) instead of oneDNN's grouped convolution backward, which is
# faster from 8x8 maps on (docs/performance_notes.md).
PER_TAP_WEIGHT_GRAD_MAX_PIXELS = 4


def _kxk_weight_grad(x, grad_out, weight, g: HetConvGeometry) -> torch.Tensor:
    """The KxK weights' gradient: a grouped convolution's weight gradient, in group order."""
    if g.layout == "shifted":
        channel_order = group_channel_order(g.in_channels, g.out_channels, g.p, g.layout, x.device)
        filter_order = group_filter_order(g.in_channels, g.out_channels, g.p, g.layout, x.device)
        x = x.index_select(1, channel_order)
        grad_out = grad_out.index_select(1, filter_order)
        weight = weight.index_select(0, filter_order)
    if grad_out.shape[2] * grad_out.shape[3] <= PER_TAP_WEIGHT_GRAD_MAX_PIXELS:
        grad = _kxk_weight_grad_per_tap(x, grad_out, g)
    else:
        grad = torch.ops.aten.convolution_backward(
            grad_out, x, weight, None, g.stride, g.padding, g.dilation, False, [0, 0], g.p, [False, True, False],
        )[1]
    if g.layout == "shifted":
        grad = torch.empty_like(grad).index_copy_(0, filter_order, grad)
    return grad


def _kxk_weight_grad_per_tap(x, grad_out, g: HetConvGeometry) -> torch.Tensor:
    """The same gradient (channels and filters in group order) as one batched GEMM per
    tap: for tap (i, j), group c's (Ng, Mg) slice is the sum over output pixels of
    grad_out's group-c filters times the input's group-c channels at that tap."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g.kernel_size, g.stride, g.padding, g.dilation
    ho, wo = grad_out.shape[2], grad_out.shape[3]
    mg, ng = g.in_channels // g.p, g.out_channels // g.p
    padded = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    grads = grad_out.permute(0, 2, 3, 1).reshape(-1, g.p, ng).permute(1, 2, 0)  # (P, Ng, pixels)
    out = x.new_empty(g.out_channels, mg, kh, kw)
    for i in range(kh):
        for j in range(kw):
            taps = padded[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
            taps = taps.permute(0, 2, 3, 1).reshape(-1, g.p, mg).transpose(0, 1)  # (P, pixels, Mg)
            out[:, :, i, j] = torch.bmm(grads, taps).reshape(g.out_channels, mg)
    return out


def prepare_direct(params, geometry: HetConvGeometry, plan, input_shape):
    """The backend's ``prepare``: packed weights for a cached inference call, else the
    parameters themselves (packed by the ops on every call)."""
    weight, pointwise_weight = params
    if plan.cache and not plan.training:
        packed = pack(weight, pointwise_weight, geometry.in_channels, geometry.p, geometry.layout,
                      lane_loads=lane_loads_pay(plan.channels_last, geometry.out_channels, geometry.p))
        return dataclasses.replace(packed, params=(weight, pointwise_weight))
    return params


def run_direct(x, prepared, bias, geometry: HetConvGeometry, plan) -> torch.Tensor:
    """The backend's ``run``: ``prepared`` is a :class:`DirectWeights` (cached eager
    inference: the kernel itself, no op dispatch) or the raw ``(weight,
    pointwise_weight)``: the registered ops, differentiable under autograd, the pack
    and packed ops otherwise (what a compiled or exported graph holds; freezing folds
    the pack). Applies the geometry's ReLU itself."""
    g = geometry
    relu = g.activation == "relu"
    if not torch.compiler.is_compiling() and under_dispatch_mode():  # library convolutions, which such modes see
        params = prepared.params if isinstance(prepared, DirectWeights) else prepared
        uncached = dataclasses.replace(plan, cache=False)
        out = run_split(x, prepare_split(params, geometry, uncached, tuple(x.shape)), bias, geometry, uncached)
        return torch.relu(out) if relu else out
    if isinstance(prepared, DirectWeights):
        out = _call(x, prepared, bias, geometry, relu)
    else:
        weight, pointwise_weight = prepared
        arguments = (list(g.kernel_size), list(g.stride), list(g.padding), list(g.dilation), g.p, g.layout)
        if plan.training:
            out = torch.ops.leanconv.hetconv_direct(x, weight, pointwise_weight, bias, *arguments)
            out = torch.relu(out) if relu else out
        else:
            isa = active_isa()
            packed = torch.ops.leanconv.hetconv_direct_pack(weight, pointwise_weight, g.in_channels, g.p, g.layout, isa)
            out = torch.ops.leanconv.hetconv_direct_packed(x, *packed, bias, g.out_channels, *arguments, relu, isa)
    # the kernel writes the format it reads (channels-last, else contiguous), as nn.Conv2d does
    return out if plan.channels_last else out.contiguous()
