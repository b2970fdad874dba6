"""leanconv's built-in backends, registered in :mod:`leanconv.ops.registry`.

HetConv (``op="hetconv"``):

| backend | how | runs |
|---|---|---|
| ``reference`` | one dense convolution with the materialised (N, M, kh, kw) weight: the readable statement every other backend is tested against | everywhere, training and inference |
| ``split`` | grouped KxK conv + zero-diagonal 1x1 conv (:mod:`.hetconv_split`); cached and oneDNN-fused in eager CPU inference | everywhere, training and inference |
| ``direct`` | the C++ kernel computing both parts in one pass (:mod:`.hetconv_direct`), built on first use | CPU, float32, channels-last or contiguous input; training and inference |
| ``triton`` | the direct Triton kernels (:mod:`.hetconv_triton`), where Triton is installed | CUDA (CPU only under ``TRITON_INTERPRET=1``); float32, bfloat16, float16 |

Depthwise (``op="depthwise"``): ``torch`` (``F.conv2d`` with groups = C, cuDNN /
oneDNN; small cached eager CPU float32 calls run with the weight prepacked for
oneDNN, see :data:`PACKED_DEPTHWISE_MAX_OUTPUT`) and ``triton``
(:mod:`.depthwise_triton`).

``auto``'s deterministic rules (:func:`hetconv_rule`, :func:`depthwise_rule`) live
here, beside the backends they name, registered with :func:`~.registry.register_rule`:

* HetConv, P = 1: ``split`` (one convolution with the layer's own weight).
* HetConv while TorchScript traces or an ONNX exporter runs: ``split`` (Conv + Conv +
  Add: standard operators only).
* HetConv on CUDA, eager: ``triton`` where it was measured faster than ``split``
  (:func:`triton_measured_win`), else as on the CPU.
* HetConv where the split form does more than 80% of the dense work (1/P + 1/K^2 >
  0.8): ``reference`` (``split`` in a captured graph).
* ``direct`` (the C++ kernel, as registered torch ops, so ``torch.compile`` and
  ``torch.export`` keep it) for float32 CPU inputs in channels-last order, and in
  contiguous order for inference and for training on larger maps
  (:func:`direct_reads_well`), where it builds and its work on this CPU's vectors is
  at most 0.8 of the dense convolution's (:func:`direct_work_ratio`; else as above:
  ``reference``, ``split`` in a captured graph);
* training of strided layers (``direct``'s input gradient would be the dense
  convolution's) and of small calls (input elements x filters x taps below
  :data:`SMALL_CALL_WORK`, where packing and materialising weights on every call
  costs more than the work): ``split``;
* otherwise in a captured graph ``split``; eagerly ``reference`` for small inference
  calls (where a second library call costs more than the saved work), else ``split``.
* Depthwise: ``torch``; the Triton kernels only by measuring.

The public P-branch form of HetConv is not a backend (it never wins); it lives
in ``benchmarks/baselines.py`` as a baseline. Triton is imported on the first
use of a triton backend, never at ``import leanconv``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .conv_geometry import DepthwiseGeometry, HetConvGeometry, conv_output_size
from . import hetconv_direct, onednn
from .hetconv_layout import materialize_dense_weight
from .hetconv_split import prepare_split, run_split
from .registry import Backend, Plan, backends, register_backend, register_rule, under_dispatch_mode, why_not_ready
from .triton_launch import SUPPORTED_DTYPES as TRITON_DTYPES, device_unsupported, triton_installed

__all__ = [
    "SMALL_CALL_WORK", "DIRECT_MAX_WORK_RATIO", "direct_work_ratio", "hetconv_rule", "depthwise_rule", "triton_measured_win", "direct_reads_well", "direct_runs",
    "register_builtin_backends",
]

SMALL_CALL_WORK = 20_000_000
_CL = torch.channels_last


# ------------------------------------------------------------------ HetConv
def _prepare_reference(params, geometry: HetConvGeometry, plan, input_shape) -> torch.Tensor:
    weight, pointwise_weight = params
    if geometry.p == 1:
        return weight
    return materialize_dense_weight(weight, pointwise_weight, geometry.p, geometry.layout)


def _run_reference(x, dense, bias, geometry: HetConvGeometry, plan) -> torch.Tensor:
    return F.conv2d(x, dense, bias, geometry.stride, geometry.padding, geometry.dilation)


def _triton_unsupported(x: torch.Tensor, geometry) -> str | None:
    reason = device_unsupported(x, "triton")
    if reason is not None:
        return reason
    try:
        import triton  # noqa: F401  (the first use imports it)
    except Exception as error:  # a broken install must not break the other backends
        return f"Triton is installed but could not be imported ({type(error).__name__}: {error})"
    return None


def _prepare_hetconv_triton(params, geometry: HetConvGeometry, plan, input_shape):
    from .hetconv_triton import pack_weights

    weight, pointwise_weight = params
    return pack_weights(weight, pointwise_weight, geometry.p, geometry.layout)


def _run_hetconv_triton(x, packed, bias, geometry: HetConvGeometry, plan) -> torch.Tensor:
    from .hetconv_triton import hetconv_triton_packed

    wk, wp = packed
    g = geometry
    return hetconv_triton_packed(x, wk, wp, bias, g.stride, g.padding, g.dilation, g.p, g.kernel_size, g.layout)


def _standard_ops_only() -> bool:
    """TorchScript tracing or an ONNX exporter: graphs of standard operators only."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _direct_unsupported(x: torch.Tensor, geometry) -> str | None:
    if _standard_ops_only():
        return ("it is a leanconv torch op, which TorchScript tracing and ONNX export cannot write as "
                "standard operators (use 'split')")
    return None


def _direct_setup() -> str | None:
    """Build (or load the cached build of) the C++ kernel."""
    if hetconv_direct.available():
        return None
    return f"its C++ kernel is unavailable: {hetconv_direct.unavailable_reason()}"


# ------------------------------------------------------------------ the rules
def triton_measured_win(x: torch.Tensor, geometry: HetConvGeometry, plan: Plan) -> bool:
    """Where ``triton`` beat ``split`` forward and forward+backward on an H100, batch
    128, channels_last (results/gpu/nvidia-h100-80gb-hbm3-hetconv-p4-b128.md): P=4,
    3x3, bfloat16/float16, 128 <= M <= 256 input channels on maps of at most 28x28.
    Everywhere else measured split was as fast or faster."""
    backend = backends("hetconv").get("triton")
    if backend is None or geometry.p != 4 or geometry.kernel_size != (3, 3):
        return False
    if plan.compute_dtype not in (torch.bfloat16, torch.float16):
        return False
    channels, height, width = x.shape[1], x.shape[2], x.shape[3]
    if not (128 <= channels <= 256 and height * width <= 28 * 28):
        return False
    return why_not_ready(backend, x, geometry, plan) is None


# NCHW training takes ``direct`` on output maps of at least this many pixels, or of at least
# NCHW_TRAIN_DIRECT_WIDE_PIXELS with at least NCHW_TRAIN_DIRECT_WIDE_CHANNELS input channels; on
# smaller maps ``split``'s oneDNN gradients were 10-40% faster (AVX-512 EPYC, batch 64, P=4/8:
# 32x32 maps 16-64 channels, 56x56 and 28x28 maps at batch 16: direct 1.1-1.6x faster than split;
# 16x16 maps: split 1.4x faster at 32 channels, direct 1.5x faster at 128; 8x8 and smaller:
# split 1.1-1.4x faster).
NCHW_TRAIN_DIRECT_PIXELS = 1024
# Training takes ``direct`` only for calls of at least this many output pixels (batch x map):
# below, packing the weights twice a step and the op's calls cost more than the kernel saves
# (batch 1: split 1.1-3.3x faster than direct on VGG-16's and ResNet-18's layers,
# results/cpu/amd-epyc-avx512-2t-layers-{vgg,resnet18}-b1).
TRAIN_DIRECT_MIN_PIXELS = 4096
NCHW_TRAIN_DIRECT_WIDE_PIXELS = 256
NCHW_TRAIN_DIRECT_WIDE_CHANNELS = 64


def direct_reads_well(x: torch.Tensor, geometry: HetConvGeometry, plan: Plan) -> bool:
    """Where ``direct`` was measured at least as fast as the library forms: channels-last
    inputs, training and inference; contiguous (NCHW) inputs in inference, and in training
    on the larger maps above (the kernel reads and writes NCHW through blocked
    channels-last copies where it must; the weight gradients run on such copies). Not in
    training of strided layers, of small calls or of calls of fewer than
    :data:`TRAIN_DIRECT_MIN_PIXELS` output pixels, where ``split`` was 1.1-3.3x faster
    (ResNet-18's stride-2 layers at batch 32 and 1, VGG-16's at batch 1:
    ``results/cpu/amd-epyc-avx512-2t-layers-{resnet18-b32,resnet18-b1,vgg-b1}``)."""
    g = geometry
    map_pixels = 1
    for d in (0, 1):
        map_pixels *= max(0, conv_output_size(x.shape[2 + d], g.kernel_size[d], g.stride[d], g.padding[d], g.dilation[d]))
    if plan.training and (g.stride != (1, 1) or _small_call(x, g) or x.shape[0] * map_pixels < TRAIN_DIRECT_MIN_PIXELS):
        return False  # split's gradients (module docstring)
    if x.is_contiguous(memory_format=_CL):
        return True
    if not x.is_contiguous():
        return False
    if not plan.training:
        return True
    return map_pixels >= NCHW_TRAIN_DIRECT_PIXELS or (
        map_pixels >= NCHW_TRAIN_DIRECT_WIDE_PIXELS and g.in_channels >= NCHW_TRAIN_DIRECT_WIDE_CHANNELS)


# ``direct`` where its vector instructions per output vector are at most this fraction of a
# dense convolution's; else the dense convolution (``reference``), which oneDNN runs at a higher
# rate: at 16 channels, P=2, 3x3 on AVX-512 (a vector holds both groups: 16 + 8 x 8 x 2 = 144
# instructions, as many as the dense 16 x 9) direct was 1.0-1.5x slower than the dense layer in
# NCHW training (benchmarks/main_job_speed.py).
DIRECT_MAX_WORK_RATIO = 0.8


def direct_work_ratio(geometry: HetConvGeometry, lanes: int) -> float:
    """The direct kernel's vector instructions per output vector of filters over a dense
    convolution's: the centre tap's M multiply-adds plus (K^2 - 1) x M/P for the other taps,
    doubled where a vector holds several groups (each multiply-add then needs a permute, or
    one pass per group); dense: M x K^2."""
    g = geometry
    taps = g.kernel_size[0] * g.kernel_size[1]
    per_group_in, per_group_out = g.in_channels // g.p, g.out_channels // g.p
    grouped = (taps - 1) * per_group_in * (2 if per_group_out < lanes else 1)
    return (g.in_channels + grouped) / (g.in_channels * taps)


def _small_call(x: torch.Tensor, g: HetConvGeometry) -> bool:
    """Input elements x filters x taps below :data:`SMALL_CALL_WORK`."""
    return x.numel() * g.out_channels * g.kernel_size[0] * g.kernel_size[1] < SMALL_CALL_WORK


def direct_runs(x: torch.Tensor, geometry: HetConvGeometry, plan: Plan) -> bool:
    """Whether the ``direct`` C++ kernel can run the call (CPU, float32, the kernel
    built: readying it builds it once)."""
    backend = backends("hetconv").get("direct")
    return backend is not None and why_not_ready(backend, x, geometry, plan) is None


def hetconv_rule(x: torch.Tensor, geometry: HetConvGeometry, plan: Plan, capturing: bool) -> str:
    """``auto``'s deterministic HetConv choice (module docstring)."""
    g = geometry
    if g.p == 1 or (capturing and _standard_ops_only()):
        return "split"
    if x.device.type == "cuda" and not capturing and triton_measured_win(x, g, plan):
        return "triton"
    taps = g.kernel_size[0] * g.kernel_size[1]
    if 1.0 / g.p + 1.0 / taps > 0.8:
        return "split" if capturing else "reference"
    if x.device.type == "cpu" and direct_reads_well(x, g, plan) and direct_runs(x, g, plan):
        if direct_work_ratio(g, hetconv_direct.lanes(hetconv_direct.active_isa())) <= DIRECT_MAX_WORK_RATIO:
            return "direct"
        return "split" if capturing else "reference"
    if not capturing and not plan.training and _small_call(x, g):
        return "reference"
    return "split"


def depthwise_rule(x: torch.Tensor, geometry: DepthwiseGeometry, plan: Plan, capturing: bool) -> str:
    """``auto``'s deterministic depthwise choice: ``torch`` (cuDNN / oneDNN); the
    Triton kernels are chosen only by measuring (not yet timed on a GPU)."""
    return "torch"


# ---------------------------------------------------------------- depthwise
# Output elements up to which a cached eager CPU float32 depthwise call runs with its weight
# prepacked for oneDNN: F.conv2d reorders the weight on every call, a tenth to a quarter of a
# small call's time (results/cpu/*-depthwise-small.md: 0.69-0.96x of F.conv2d's time up to
# here in both memory formats; beyond it the contiguous input's two layout copies cost more).
PACKED_DEPTHWISE_MAX_OUTPUT = 8192


@dataclass(frozen=True)
class PackedDepthwise:
    """A depthwise weight prepacked for oneDNN (``torch.ops.mkldnn``) for one input
    shape, and the weight itself: a call made under a torch dispatch mode (e.g.
    ``FlopCounterMode``, which does not know oneDNN's op) runs ``F.conv2d`` with it."""

    weight: torch.Tensor
    packed: torch.Tensor
    padding: list[int]  # the geometry as oneDNN's op takes it, built once
    stride: list[int]
    dilation: list[int]


def packs_depthwise(geometry: DepthwiseGeometry, plan, input_shape, weight: torch.Tensor) -> bool:
    """Whether a depthwise call prepacks its weight (see :data:`PACKED_DEPTHWISE_MAX_OUTPUT`):
    cached eager inference, CPU float32 with oneDNN on, symmetric padding, a small output."""
    g = geometry
    if not (plan.cache and plan.compute_dtype == torch.float32 and weight.device.type == "cpu"
            and g.padding is not None and torch.backends.mkldnn.is_available() and torch._C._get_mkldnn_enabled()):
        return False
    height, width = (conv_output_size(input_shape[2 + i], g.kernel_size[i], g.stride[i], g.padding[i], g.dilation[i])
                     for i in (0, 1))
    return input_shape[0] * g.out_channels * height * width <= PACKED_DEPTHWISE_MAX_OUTPUT


def _prepare_depthwise(params, geometry: DepthwiseGeometry, plan, input_shape) -> torch.Tensor:
    return params[0]


def _prepare_depthwise_torch(params, geometry: DepthwiseGeometry, plan, input_shape):
    weight = params[0]
    if not packs_depthwise(geometry, plan, input_shape, weight):
        return weight
    padding, stride, dilation = list(geometry.padding), list(geometry.stride), list(geometry.dilation)
    return PackedDepthwise(weight, onednn.prepack(weight, padding, stride, dilation, geometry.in_channels, input_shape),
                           padding, stride, dilation)


def _run_depthwise_torch(x, weight, bias, geometry: DepthwiseGeometry, plan) -> torch.Tensor:
    g = geometry
    if isinstance(weight, PackedDepthwise):
        if not under_dispatch_mode():  # oneDNN answers in channels-last; nn.Conv2d keeps the input's format
            out = onednn.conv2d(x, weight.packed, bias, weight.padding, weight.stride, weight.dilation, g.in_channels)
            return out if plan.channels_last else out.contiguous()
        weight = weight.weight
    padding = "same" if g.padding is None else g.padding  # None: 'same' with uneven sides
    return F.conv2d(x, weight, bias, g.stride, padding, g.dilation, g.in_channels)


def _depthwise_triton_unsupported(x: torch.Tensor, geometry: DepthwiseGeometry) -> str | None:
    if geometry.padding is None:
        return "it needs symmetric padding; padding='same' pads this kernel unevenly (use backend='torch')"
    return _triton_unsupported(x, geometry)


def _run_depthwise_triton(x, weight, bias, geometry: DepthwiseGeometry, plan) -> torch.Tensor:
    from .depthwise_triton import depthwise_triton

    return depthwise_triton(x, weight, bias, geometry.stride, geometry.padding, geometry.dilation)


def register_builtin_backends() -> None:
    register_backend(Backend(
        "reference", "hetconv", _prepare_reference, _run_reference,
        description="one dense convolution with the materialised (N, M, kh, kw) weight (readable; the tests' oracle)",
    ))
    register_backend(Backend(
        "split", "hetconv", prepare_split, run_split,
        description="grouped KxK conv + zero-diagonal 1x1 conv; cached and oneDNN-fused in CPU inference",
    ))
    register_backend(Backend(
        "direct", "hetconv", hetconv_direct.prepare_direct, hetconv_direct.run_direct, devices=("cpu",),
        dtypes=(torch.float32,), unsupported=_direct_unsupported, setup=_direct_setup,
        activations=("relu",),
        description="C++ CPU kernel: both parts of HetConv in one register-blocked pass (built on first use)",
    ))
    register_backend(Backend(
        "torch", "depthwise", _prepare_depthwise_torch, _run_depthwise_torch,
        description="F.conv2d with groups = in_channels (cuDNN / oneDNN)",
    ))
    if triton_installed():  # listed without importing Triton; imported on first use
        register_backend(Backend(
            "triton", "hetconv", _prepare_hetconv_triton, _run_hetconv_triton, devices=("cuda", "cpu"),
            dtypes=TRITON_DTYPES,
            unsupported=_triton_unsupported, measured=("cuda",),
            description="direct HetConv: Triton implicit-GEMM forward, input- and weight-gradient kernels (CUDA)",
        ))
        register_backend(Backend(
            "triton", "depthwise", _prepare_depthwise, _run_depthwise_triton, devices=("cuda", "cpu"),
            dtypes=TRITON_DTYPES,
            unsupported=_depthwise_triton_unsupported, measured=("cuda",),
            description="direct depthwise forward, input- and weight-gradient Triton kernels (CUDA)",
        ))

    register_rule("hetconv", hetconv_rule)
    register_rule("depthwise", depthwise_rule)


register_builtin_backends()
