"""leanconv's global switches, in one place (in the spirit of timm's ``layers/config.py``).

Each switch has a default, an environment variable read once (when leanconv is
imported, so that nothing is read inside a traced or compiled forward), a setter for the rest of the process and a thread-local context
manager that nests. Nothing here writes ``os.environ``.

| switch | environment variable | setter | context manager |
|---|---|---|---|
| HetConv backend | ``LEANCONV_BACKEND`` | :func:`set_backend` | :func:`use_backend` |
| depthwise backend | ``LEANCONV_DEPTHWISE_BACKEND`` | :func:`set_depthwise_backend` | :func:`use_depthwise_backend` |
| measuring (off by default) | ``LEANCONV_BENCHMARK`` | :func:`set_benchmark` | :func:`benchmarking` |
| file of measured choices | ``LEANCONV_BENCHMARK_CACHE`` | :func:`set_benchmark_cache` | |

Precedence of a backend choice: a layer's own ``backend=`` argument, the
innermost context manager, the setter (or, if never called, the environment
variable), then ``"auto"``. ``auto`` follows a deterministic rule (see
:mod:`leanconv.ops.dispatch`) unless measuring is on, like
``torch.backends.cudnn.benchmark``.

Names are validated where they are used (the registry lives in
:mod:`leanconv.ops.registry`, which imports this module, not the reverse).

:data:`generation` counts changes that invalidate every remembered plan (a backend
registered or removed, measured choices cleared, the environment re-read); the
switches' values themselves are part of each layer's plan key.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

__all__ = [
    "BACKEND_ENV",
    "DEPTHWISE_BACKEND_ENV",
    "BENCHMARK_ENV",
    "BENCHMARK_CACHE_ENV",
    "backend",
    "set_backend",
    "use_backend",
    "depthwise_backend",
    "set_depthwise_backend",
    "use_depthwise_backend",
    "benchmark_enabled",
    "set_benchmark",
    "benchmarking",
    "benchmark_cache",
    "set_benchmark_cache",
    "generation",
]

BACKEND_ENV = "LEANCONV_BACKEND"
DEPTHWISE_BACKEND_ENV = "LEANCONV_DEPTHWISE_BACKEND"
BENCHMARK_ENV = "LEANCONV_BENCHMARK"
BENCHMARK_CACHE_ENV = "LEANCONV_BENCHMARK_CACHE"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class _Settings:
    """Process-wide values; ``None`` until the environment has been read."""

    backend: str | None = None
    depthwise_backend: str | None = None
    benchmark: bool | None = None
    benchmark_cache: str | None = None
    sources: dict[str, str] = {}


_settings = _Settings()
_local = threading.local()
_lock = threading.Lock()
generation = [0]  # a list so that readers holding the module see every change


def _read_environment() -> None:
    """Read the environment once (at import; again only after an invalid value raised)."""
    with _lock:
        if _settings.benchmark is not None:
            return
        name = os.environ.get(BACKEND_ENV, "").strip()
        _settings.backend = name or "auto"
        _settings.sources["backend"] = f"environment variable {BACKEND_ENV}" if name else "default"
        name = os.environ.get(DEPTHWISE_BACKEND_ENV, "").strip()
        _settings.depthwise_backend = name or "auto"
        _settings.sources["depthwise_backend"] = f"environment variable {DEPTHWISE_BACKEND_ENV}" if name else "default"
        flag = os.environ.get(BENCHMARK_ENV, "").strip().lower()
        if flag not in _TRUE + _FALSE:
            raise ValueError(
                f"environment variable {BENCHMARK_ENV} must be one of {_TRUE + _FALSE[1:]}, got {flag!r}"
            )
        _settings.benchmark_cache = os.environ.get(BENCHMARK_CACHE_ENV, "").strip() or None
        _settings.benchmark = flag in _TRUE


def _stack(kind: str):
    """This thread's context-manager stack of ``kind`` (empty until a block opens one). Reading
    creates nothing, so that a compiled graph's guard on it stays true on the next call."""
    return getattr(_local, kind, None) or ()


@contextlib.contextmanager
def _pushed(kind: str, value) -> Iterator[None]:
    stack = getattr(_local, kind, None)
    if stack is None:
        stack = []
        setattr(_local, kind, stack)
    stack.append(value)
    try:
        yield
    finally:
        stack.pop()


# ------------------------------------------------------------------ backends
def _in_force(kind: str):
    """The value of switch ``kind`` ("backend", "depthwise_backend", "benchmark"):
    the innermost context manager, else the setter's, else the environment's."""
    stack = _stack(kind)
    if stack:
        return stack[-1]
    if _settings.benchmark is None:
        _read_environment()
    return getattr(_settings, kind)


def _source(kind: str, context_manager: str) -> str:
    """Where :func:`_in_force` takes ``kind`` from (for error messages)."""
    if _stack(kind):
        return context_manager
    _in_force(kind)
    return _settings.sources[kind]


def _set(kind: str, value, setter: str) -> None:
    _in_force(kind)  # the environment is read first, so that it never overrides a setter later
    setattr(_settings, kind, value)
    _settings.sources[kind] = setter


def backend() -> str:
    """The HetConv backend name in force for layers without their own ``backend=``."""
    return _in_force("backend")


def backend_source() -> str:
    return _source("backend", "leanconv.use_backend")


def set_backend(name: str) -> None:
    """Set the process-wide HetConv backend (``"auto"`` restores the rule)."""
    _set("backend", name, "leanconv.config.set_backend")


def use_backend(name: str):
    """``with leanconv.use_backend("reference"): ...``: the HetConv backend of every
    layer without its own ``backend=`` inside the block (thread-local, nestable)."""
    return _pushed("backend", name)


def depthwise_backend() -> str:
    """The depthwise backend name in force for layers without their own ``backend=``."""
    return _in_force("depthwise_backend")


def depthwise_backend_source() -> str:
    return _source("depthwise_backend", "leanconv.ops.use_depthwise_backend")


def set_depthwise_backend(name: str) -> None:
    _set("depthwise_backend", name, "leanconv.config.set_depthwise_backend")


def use_depthwise_backend(name: str):
    """Thread-local, nestable: the depthwise backend inside the block."""
    return _pushed("depthwise_backend", name)


def dispatch_state(op: str) -> tuple:
    """What a layer's remembered plan depends on besides its input, in one call:
    (backend name in force for ``op``, measuring on?). On the hot path of every
    call, so written out rather than through :func:`_in_force`."""
    local = _local.__dict__
    stack = local.get("backend" if op == "hetconv" else "depthwise_backend")
    measuring = local.get("benchmark")
    if _settings.benchmark is None:
        _read_environment()
    name = stack[-1] if stack else (_settings.backend if op == "hetconv" else _settings.depthwise_backend)
    return name, measuring[-1] if measuring else _settings.benchmark


# ----------------------------------------------------------------- measuring
def benchmark_enabled() -> bool:
    """Whether ``auto`` measures the candidates (off by default)."""
    return _in_force("benchmark")


def set_benchmark(enabled: bool) -> None:
    """Turn measuring on or off for the process (like ``torch.backends.cudnn.benchmark``)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_benchmark: enabled must be True or False, got {enabled!r}")
    _set("benchmark", enabled, "leanconv.config.set_benchmark")


def benchmarking(enabled: bool = True):
    """``with leanconv.config.benchmarking(): ...``: measuring on (or off) inside the block."""
    if not isinstance(enabled, bool):
        raise TypeError(f"benchmarking: enabled must be True or False, got {enabled!r}")
    return _pushed("benchmark", enabled)


def benchmark_cache() -> str | None:
    """Path of the JSON file that keeps measured choices across processes, or None."""
    return _in_force("benchmark_cache")


def set_benchmark_cache(path: str | os.PathLike | None) -> None:
    _set("benchmark_cache", None if path is None else os.fspath(path), "leanconv.config.set_benchmark_cache")


def _read_environment_now() -> None:
    """Read the environment at once. An invalid value leaves the switches unread, so
    that the first use raises the error naming the variable (importing leanconv never
    fails on the environment)."""
    try:
        _read_environment()
    except ValueError:
        pass


def _reset_for_tests() -> None:
    """Forget every setter and re-read the environment (tests only)."""
    with _lock:
        _settings.backend = _settings.depthwise_backend = _settings.benchmark = _settings.benchmark_cache = None
        _settings.sources = {}
    _read_environment_now()
    generation[0] += 1


# Read here, at import: TorchDynamo cannot trace the lock of a first read inside a layer's
# forward, which made ``torch.compile(fullgraph=True)`` fail as a fresh process's first call.
_read_environment_now()
