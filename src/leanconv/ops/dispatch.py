"""The one dispatch path: which backend runs a call, with which prepared weights.

``leanconv.HetConv2d``, ``leanconv.DepthwiseConv2d`` (through a
:class:`Dispatcher` each) and ``leanconv.functional`` (through
:func:`dispatch_call`) all come here. For a call it decides a :class:`Plan`:

1. the backend name in force: the layer's ``backend=``, else the innermost
   ``use_backend`` block, else ``set_backend`` / the environment variable, else
   ``"auto"`` (:mod:`leanconv.config`);
2. *training*: autograd will run a backward pass through the call (grad mode on
   and the input or a parameter requires grad);
3. the compute dtype: autocast's on the input's device where autocast is on
   (float32 and low-precision inputs are cast, as ``nn.Conv2d`` is; the output
   has that dtype), else the input's;
4. ``auto`` becomes a backend by the deterministic rule (:func:`hetconv_rule`,
   :func:`depthwise_rule`), or by measuring where the user turned measuring on
   (:mod:`leanconv.ops.measure`); a backend a user registered with a
   ``prefer`` predicate is taken first wherever it says so;
5. a named backend that cannot run the call is an error saying why.

Prepared weights (a backend's ``prepare``) are cached by a layer only for eager
calls without autograd, keyed on the plan and on the parameters' version
counters and storage, so an optimizer step, ``load_state_dict`` or ``.to()``
rebuilds them; under autograd, and while a graph is traced, compiled or
exported, they are built differentiably on every call. A layer remembers its
plan per input setting (shape, dtype, device, memory format, training,
inference mode, autocast, configuration), so a repeated call costs a dictionary
lookup.

The rules themselves (the same on every run; documented in the README's backend
table) belong to the backends: each op's is registered with its built-in backends
(:mod:`leanconv.ops.backends`); this module names no backend. A backend with a
``setup`` (a kernel to build) is readied by :func:`~.registry.ensure_ready` before
its first use (:func:`~.registry.why_not_ready`), outside any predicate.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import config
from . import measure
from .conv_geometry import check_conv_input, check_window_fits, pad_for_mode
from .registry import Backend, Plan, auto_rule, backends, check_backend_name, get_backend, why_not_ready

__all__ = [
    "graph_capturing",
    "compute_dtype",
    "make_plan",
    "dispatch_call",
    "Dispatcher",
]

_CL = torch.channels_last
# The per-call checks, bound once (each dotted lookup costs on a path that runs per layer call).
_tracing_state = torch._C._get_tracing_state
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_inference_mode = torch.is_inference_mode_enabled
_any_autocast = torch._C._is_any_autocast_enabled
_generation = config.generation
_dispatch_state = config.dispatch_state


def graph_capturing() -> bool:
    """True while TorchScript traces (so ``torch.onnx.export(dynamo=False)``) or
    TorchDynamo captures (``torch.compile``, ``torch.export``, the dynamo ONNX exporter)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution of ``x`` computes in: autocast's on ``x``'s device
    where autocast is on (float64 and non-floating inputs are left alone, as
    autocast does), else ``x.dtype``."""
    if not torch._C._is_any_autocast_enabled() or not x.is_floating_point() or x.dtype == torch.float64:
        return x.dtype
    device = x.device.type
    try:
        enabled = torch.is_autocast_enabled(device)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return x.dtype
    return torch.get_autocast_dtype(device) if enabled else x.dtype


def _requested(op: str, argument: str | None, source: str) -> tuple[str, str]:
    """The backend name in force and where it comes from (for error messages)."""
    if argument is not None:
        return argument, source
    if op == "hetconv":
        return config.backend(), config.backend_source()
    return config.depthwise_backend(), config.depthwise_backend_source()


def _needs_autograd(x: torch.Tensor, tensors) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in tensors))


def _measurable(x: torch.Tensor, capturing: bool) -> bool:
    if capturing or not config.benchmark_enabled():
        return False
    return not (x.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _measure(op: str, x, params, bias, geometry, plan: Plan, prefer: str) -> str:
    """Time every registered backend of ``op`` that can run the call."""
    names = [
        name for name, b in backends(op).items()
        if x.device.type in b.measured and why_not_ready(b, x, geometry, plan) is None
    ]
    if len(names) < 2:
        return prefer if prefer in names or not names else names[0]

    def candidate(name: str):
        backend = get_backend(name, op)
        trial = Plan(name, plan.training, plan.channels_last, plan.compute_dtype, cache=not plan.training)
        if plan.training:
            def forward(x, bias, *params):
                return _execute(backend, x, params, bias, geometry, trial, None)

            return measure.forward_backward(forward, (x, bias, *params))

        prepared = []  # inference: prepared once, in the untimed warm-up run, as a layer caches them

        def run():
            with torch.no_grad():
                xc, paramsc, biasc = _autocast_inputs(x, params, bias, trial)
                if not prepared:
                    prepared.append(backend.prepare(paramsc, geometry, trial, tuple(xc.shape)))
                backend.run(xc, prepared[0], biasc, geometry, trial)

        return run

    key = measure.setting_key(op, x, plan, *geometry, "bias" if bias is not None else "nobias")
    return measure.measured_choice(
        key, {name: candidate(name) for name in names}, prefer=prefer, synchronize=measure.synchronizer(x),
        rounds=5 if x.numel() * geometry.out_channels < 200_000_000 else 3,
    )


def make_plan(op: str, requested: str | None, x: torch.Tensor, params, bias, geometry, *, source: str = "backend") -> Plan:
    """Decide how a call runs (module docstring); ``x`` is 4-D and padded for its mode."""
    capturing = graph_capturing()
    name, source = _requested(op, requested, source)
    training = _needs_autograd(x, (*params, bias))
    channels_last = x.is_contiguous(memory_format=_CL) and not x.is_contiguous()
    plan = Plan("auto", training, channels_last, compute_dtype(x), cache=not (training or capturing))
    if name == "auto":
        for candidate in reversed(list(backends(op).values())):  # the latest registration first
            prefer = candidate.prefer
            if prefer is not None and why_not_ready(candidate, x, geometry, plan) is None and prefer(x, geometry, plan):
                name = candidate.name
                break
        else:
            name = auto_rule(op)(x, geometry, plan, capturing)
            if _measurable(x, capturing):
                name = _measure(op, x, params, bias, geometry, plan, prefer=name)
    backend = get_backend(check_backend_name(name, op, source), op)
    reason = why_not_ready(backend, x, geometry, plan)
    if reason is not None:
        raise ValueError(f"{source}: backend {name!r} cannot run this call: {reason}")
    return Plan(name, training, channels_last, plan.compute_dtype, plan.cache)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _autocast_inputs(x, params, bias, plan: Plan):
    """Under autocast (the plan computes in another dtype than the input's), the
    input, parameters and bias in autocast's dtype, as autocast casts them for
    ``F.conv2d``; otherwise unchanged (mismatched dtypes are the backend's error,
    as they are ``F.conv2d``'s)."""
    dtype = plan.compute_dtype
    if x.dtype == dtype:
        return x, params, bias
    return _cast(x, dtype), tuple(_cast(t, dtype) for t in params), _cast(bias, dtype)


def _activate(out: torch.Tensor, backend: Backend, geometry, plan: Plan) -> torch.Tensor:
    """The geometry's output activation (``leanconv.fuse``), where the backend did not apply it."""
    activation = geometry.activation
    if activation is None or activation in backend.activations:
        return out
    return out.relu_() if plan.cache else torch.relu(out)


def _execute(backend: Backend, x, params, bias, geometry, plan: Plan, prepared):
    x, params, bias = _autocast_inputs(x, params, bias, plan)
    if prepared is None:
        prepared = backend.prepare(params, geometry, plan, tuple(x.shape))
    return _activate(backend.run(x, prepared, bias, geometry, plan), backend, geometry, plan)


def dispatch_call(op: str, x: torch.Tensor, params, bias, geometry, requested: str | None = None, *, source: str = "backend"):
    """One call without a layer's cache (``leanconv.functional``): plan and run.
    ``x`` is 4-D and already padded for its padding mode."""
    check_window_fits(x, geometry, f"leanconv.functional ({op})")
    plan = make_plan(op, requested, x, params, bias, geometry, source=source)
    if plan.cache:  # nothing keeps the prepared weights here: prepare nothing meant to be kept (no oneDNN packing)
        plan = dataclasses.replace(plan, cache=False)
    return _execute(get_backend(plan.backend, op), x, params, bias, geometry, plan, None)


class _Entry:
    """A layer's remembered plan for one input setting, with its prepared weights."""

    __slots__ = ("plan", "backend", "stamp", "prepared")

    def __init__(self, plan: Plan, backend: Backend) -> None:
        self.plan, self.backend, self.stamp, self.prepared = plan, backend, None, None


class Dispatcher:
    """A layer's dispatch: remembers plans per input setting and caches prepared
    weights for eager inference. Not part of the layer's state (copies, pickles
    and ``state_dict`` leave it behind; a copy builds its own on first call)."""

    __slots__ = ("op", "layer_name", "entries", "last_backend")

    MAX_ENTRIES = 64

    def __init__(self, op: str, layer_name: str) -> None:
        self.op, self.layer_name, self.entries = op, layer_name, {}
        self.last_backend: str | None = None

    def __call__(self, input: torch.Tensor, params: tuple, bias, geometry, requested: str | None, mode_padding=None):
        """Run the layer's op on ``input`` (3-D or 4-D). ``geometry.padding`` is the
        convolution's zero padding; ``mode_padding``, for a non-zero padding mode,
        is ``(pair, mode)`` applied explicitly first (then ``geometry.padding`` is 0)."""
        if _tracing_state() or _is_compiling() or not isinstance(input, torch.Tensor):
            return self.uncached(input, params, bias, geometry, requested, mode_padding)
        training = _grad_enabled() and (
            input.requires_grad or any(t.requires_grad for t in params) or (bias is not None and bias.requires_grad)
        )
        # The input's setting (shape and strides fix the memory format), autograd and inference
        # mode, the configuration in force, autocast: everything a plan depends on.
        key = (
            input.shape, input.stride(), input.dtype, input.device, training, _inference_mode(),
            _generation[0], requested, _dispatch_state(self.op),
            _autocast_state(input) if _any_autocast() else None,
        )
        entry = self.entries.get(key)
        if entry is None:
            entry = self._plan(key, input, params, bias, geometry, requested, mode_padding)
        unbatched = input.dim() == 3
        x = input.unsqueeze(0) if unbatched else input
        if mode_padding is not None:
            x, _ = pad_for_mode(x, *mode_padding)
        plan = entry.plan
        self.last_backend = plan.backend
        if plan.cache:
            try:  # version counters (in-place updates) and storage (.data, .to(), assign=True) of each parameter
                if len(params) == 2:
                    first, second = params
                    stamp = (first._version, second._version, first.data_ptr(), second.data_ptr())
                elif len(params) == 1:
                    (first,) = params
                    stamp = (first._version, first.data_ptr())
                else:
                    stamp = tuple([t._version for t in params] + [t.data_ptr() for t in params])
            except RuntimeError:  # parameters created under inference_mode have no version counter: no cache
                stamp = None
            if stamp is None:
                out = _execute(entry.backend, x, params, bias, geometry, plan, None)
            else:
                if entry.stamp != stamp:
                    with torch.no_grad():
                        _, cast_params, _ = _autocast_inputs(x, params, None, plan)
                        entry.prepared = entry.backend.prepare(cast_params, geometry, plan, tuple(x.shape))
                    entry.stamp = stamp
                if x.dtype is not plan.compute_dtype:
                    x, _, bias = _autocast_inputs(x, (), bias, plan)
                out = entry.backend.run(x, entry.prepared, bias, geometry, plan)
                if geometry.activation is not None:  # checked here first: the common case pays no call
                    out = _activate(out, entry.backend, geometry, plan)
        else:
            out = _execute(entry.backend, x, params, bias, geometry, plan, None)
        return out.squeeze(0) if unbatched else out

    def _plan(self, key, input, params, bias, geometry, requested, mode_padding) -> _Entry:
        x = self._checked(input, geometry, mode_padding)
        plan = make_plan(self.op, requested, x, params, bias, geometry, source=f"{self.layer_name}: backend")
        entry = _Entry(plan, get_backend(plan.backend, self.op))
        capturing_cuda = x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not capturing_cuda:  # a plan made during a CUDA-graph capture is for the capture only
            if len(self.entries) >= self.MAX_ENTRIES:
                self.entries.clear()
            self.entries[key] = entry
        return entry

    def _checked(self, input, geometry, mode_padding) -> torch.Tensor:
        check_conv_input(input, geometry.in_channels, self.layer_name)
        x = input.unsqueeze(0) if input.dim() == 3 else input
        if mode_padding is not None:
            x, _ = pad_for_mode(x, *mode_padding)
        check_window_fits(x, geometry, self.layer_name)
        return x

    def uncached(self, input, params, bias, geometry, requested, mode_padding=None):
        """A call that remembers nothing: while a graph is traced, compiled or exported."""
        x = self._checked(input, geometry, mode_padding)
        plan = make_plan(self.op, requested, x, params, bias, geometry, source=f"{self.layer_name}: backend")
        self.last_backend = plan.backend
        out = _execute(get_backend(plan.backend, self.op), x, params, bias, geometry, plan, None)
        return out.squeeze(0) if input.dim() == 3 else out


def _autocast_state(x: torch.Tensor):
    device = x.device.type
    return (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None

