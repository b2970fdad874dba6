"""The backend registry: every implementation of a leanconv op, and where it runs.

A backend is one exact implementation of an op (``"hetconv"`` or
``"depthwise"``): every backend of an op computes the same function, to
rounding; they differ only in speed. It declares

* where it runs: ``devices`` (None: any device), ``dtypes`` (None: any floating dtype),
  ``training`` (autograd through it) and ``inference``, and
  ``memory_formats`` (``"contiguous"``, ``"channels_last"``);
* ``prepare(params, geometry, plan, input_shape)``: the weight-derived tensors it needs
  (differentiable when ``plan.training``; a layer caches the result of an
  inference call until a parameter changes);
* ``run(x, prepared, bias, geometry, plan)``: the call on an input already
  padded for its padding mode.

``unsupported(x, geometry)`` may add a reason of its own (a sentence) for inputs
it cannot take, and ``prefer(x, geometry, plan)`` claims calls for ``auto``'s
deterministic rule (how a user's backend becomes the default where it wins).
``setup()`` readies a backend once (e.g. builds its C++ kernel) and returns None or
why it cannot run at all; :func:`ensure_ready` calls it (the dispatcher does, before
a backend's first use), never ``why_not``, which only reads the outcome.

Each op's deterministic ``auto`` rule is registered beside its built-in backends
(:func:`register_rule`; :mod:`leanconv.ops.backends`), so the dispatcher names none. ``leanconv.HetConv2d``, ``leanconv.DepthwiseConv2d``,
``leanconv.functional`` and a backend registered by a user all dispatch through
:mod:`leanconv.ops.dispatch`, which picks among these entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .. import config
from .tracing import assume_constant_result
from .triton_launch import TRITON_MISSING, triton_installed

__all__ = [
    "OPS",
    "Backend",
    "Plan",
    "register_backend",
    "unregister_backend",
    "register_rule",
    "auto_rule",
    "ensure_ready",
    "why_not_ready",
    "backend_names",
    "get_backend",
    "check_backend_name",
    "set_backend",
    "use_backend",
    "set_depthwise_backend",
    "use_depthwise_backend",
]

OPS = ("hetconv", "depthwise")
MEMORY_FORMATS = ("contiguous", "channels_last")
FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# Whether a torch dispatch mode (FlopCounterMode, fake tensors, ...) is active: backends that run
# oneDNN ops such modes do not know run their unpacked weights then.
under_dispatch_mode = torch._C._len_torch_dispatch_stack


def watched() -> bool:
    """A tracer, an exporter, graph capture or a torch dispatch mode is recording or watching
    the call: the inference-only CPU paths (oneDNN's prepacked op, the direct separable
    kernels) give way to standard operators then."""
    return (torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()
            or bool(under_dispatch_mode()))


@dataclass(frozen=True)
class Plan:
    """How one call runs: decided once per input setting and kept by the layer.

    ``backend``: the registered name; ``training``: autograd will run through
    the call; ``channels_last``: the input is in channels-last order;
    ``compute_dtype``: the dtype the convolution runs in (autocast's, or the
    input's); ``cache``: whether the prepared weights may be cached (eager
    inference, not while a graph is traced, compiled or exported).
    """

    backend: str
    training: bool
    channels_last: bool
    compute_dtype: torch.dtype
    cache: bool


@dataclass(frozen=True)
class Backend:
    """One exact implementation of ``op``; see the module docstring."""

    name: str
    op: str
    prepare: Callable[..., Any]
    run: Callable[..., torch.Tensor]
    devices: tuple[str, ...] | None = None  # None: any device (pure torch ops)
    dtypes: tuple[torch.dtype, ...] | None = None
    training: bool = True
    inference: bool = True
    memory_formats: tuple[str, ...] = MEMORY_FORMATS
    unsupported: Callable[[torch.Tensor, Any], str | None] | None = None
    description: str = ""
    # Devices where the opt-in measuring ``auto`` times this backend (the Triton
    # backends run on the CPU only interpreted, for tests: never worth timing there).
    measured: tuple[str, ...] = ("cpu", "cuda")
    # ``prefer(x, geometry, plan) -> bool``: where True (and the backend can run the
    # call), ``auto``'s deterministic rule picks this backend before the built-in rule.
    prefer: Callable[[torch.Tensor, Any, Plan], bool] | None = None
    # The output activations (``geometry.activation``, set by ``leanconv.fuse``) whose
    # ``run`` applies them itself; the dispatcher applies any other after ``run``.
    activations: tuple[str, ...] = ()
    # ``setup() -> str | None``: readies the backend once (builds a kernel); None or why it cannot run.
    setup: Callable[[], str | None] | None = None

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"Backend.op must be one of {OPS}, got {self.op!r}")
        if not isinstance(self.name, str) or not self.name or self.name == "auto":
            raise ValueError(f"Backend.name must be a non-empty string other than 'auto', got {self.name!r}")
        if not (self.training or self.inference):
            raise ValueError(f"backend {self.name!r} must run in training, inference or both")
        bad = [f for f in self.memory_formats if f not in MEMORY_FORMATS]
        if bad or not self.memory_formats:
            raise ValueError(f"Backend.memory_formats must be a non-empty subset of {MEMORY_FORMATS}, got {self.memory_formats!r}")

    def why_not(self, x: torch.Tensor, geometry, plan: Plan) -> str | None:
        """None when this backend can run the call, else the reason (a sentence)."""
        if self.devices is not None and x.device.type not in self.devices:
            return f"it runs on {', '.join(self.devices)}, the input is on {x.device.type}"
        dtypes = FLOATING if self.dtypes is None else self.dtypes
        if plan.compute_dtype not in dtypes:
            return f"it runs {', '.join(str(d).replace('torch.', '') for d in dtypes)}, the call computes in {plan.compute_dtype}"
        if plan.training and not self.training:
            return "it runs inference only and autograd needs a backward pass through this call"
        if not plan.training and not self.inference:
            return "it runs training only"
        memory_format = "channels_last" if plan.channels_last else "contiguous"
        if memory_format not in self.memory_formats:
            return f"it takes {' or '.join(self.memory_formats)} inputs, the input is {memory_format}"
        if self.setup is not None:
            state = _SETUP.get((self.op, self.name))
            if state is None:
                return (f"it has not been set up yet (leanconv.ops.ensure_ready({self.op!r}, {self.name!r}) "
                        "does that; the dispatcher does before the backend's first use)")
            if state:
                return state
        if self.unsupported is not None:
            return self.unsupported(x, geometry)
        return None


_REGISTRY: dict[str, dict[str, Backend]] = {op: {} for op in OPS}
_RULES: dict[str, Callable[..., str]] = {}
_SETUP: dict[tuple[str, str], str] = {}  # (op, name) -> "" once ready, else why it cannot run


@assume_constant_result  # traced graphs see a constant; the setup runs eagerly, once
def ensure_ready(op: str, name: str) -> str:
    """Run backend ``name`` of ``op``'s ``setup`` once (e.g. build its kernel); returns
    "" when it is ready (or needs no setup), else why it cannot run."""
    key = (op, name)
    state = _SETUP.get(key)
    if state is None:
        backend = _REGISTRY[op].get(name)
        if backend is None or backend.setup is None:
            return ""
        state = _SETUP[key] = backend.setup() or ""
    return state


def why_not_ready(backend: Backend, x: torch.Tensor, geometry, plan: Plan) -> str | None:
    """:meth:`Backend.why_not` after :func:`ensure_ready`: None when the backend is set up
    and can run the call, else why not (what the dispatcher and the rules ask)."""
    ensure_ready(backend.op, backend.name)
    return backend.why_not(x, geometry, plan)


def register_rule(op: str, rule: Callable[..., str]) -> None:
    """``auto``'s deterministic choice for ``op``: ``rule(x, geometry, plan, capturing)`` returns a
    registered backend's name (see :mod:`leanconv.ops.backends` for the built-in rules)."""
    if op not in OPS:
        raise ValueError(f"register_rule: op must be one of {OPS}, got {op!r}")
    _RULES[op] = rule
    config.generation[0] += 1


def auto_rule(op: str) -> Callable[..., str]:
    return _RULES[op]


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend. Only exact implementations may be registered:
    the tests of a registered backend are the tests every backend passes."""
    if not isinstance(backend, Backend):
        raise TypeError(f"register_backend: expected a leanconv.ops.registry.Backend, got {type(backend).__name__}")
    _REGISTRY[backend.op][backend.name] = backend
    _SETUP.pop((backend.op, backend.name), None)
    config.generation[0] += 1  # layers re-plan: the choice may change


def unregister_backend(op: str, name: str) -> None:
    """Remove a backend registered with :func:`register_backend`."""
    _REGISTRY[op].pop(name, None)
    config.generation[0] += 1


def backends(op: str) -> dict[str, Backend]:
    """The registered backends of ``op`` (name -> Backend), in registration order."""
    return _REGISTRY[op]


def backend_names(op: str = "hetconv") -> tuple[str, ...]:
    """All names accepted by ``backend=`` for ``op``: ``"auto"`` and the registered backends."""
    return ("auto", *_REGISTRY[op])


def check_backend_name(name: str | None, op: str = "hetconv", source: str = "backend") -> str | None:
    """``name`` if it is ``"auto"`` or a registered backend of ``op`` (None passes), else a ValueError."""
    if name is None:
        return None
    if name == "triton" and name not in _REGISTRY[op] and not triton_installed():
        raise ValueError(f"{source}: {TRITON_MISSING}")
    if not isinstance(name, str) or (name != "auto" and name not in _REGISTRY[op]):
        raise ValueError(f"{source} must be one of {backend_names(op)}, got {name!r}")
    return name


def get_backend(name: str, op: str = "hetconv") -> Backend:
    check_backend_name(name, op)
    if name == "auto":
        raise ValueError("'auto' is a rule (leanconv.ops.dispatch), not a backend of its own")
    return _REGISTRY[op][name]


def set_backend(name: str) -> None:
    """Process-wide HetConv backend for layers without ``backend=`` (validated)."""
    config.set_backend(check_backend_name(name, "hetconv", "set_backend: name"))


def use_backend(name: str):
    """``with leanconv.use_backend(name):`` -- every HetConv layer without its own
    ``backend=`` uses ``name`` inside the block (thread-local, nestable)::

        with leanconv.use_backend("reference"):
            y = model(x)
    """
    return config.use_backend(check_backend_name(name, "hetconv", "use_backend: name"))


def set_depthwise_backend(name: str) -> None:
    config.set_depthwise_backend(check_backend_name(name, "depthwise", "set_depthwise_backend: name"))


def use_depthwise_backend(name: str):
    return config.use_depthwise_backend(check_backend_name(name, "depthwise", "use_depthwise_backend: name"))
