"""leanconv's global switches, in one place (in the spirit of timm's ``layers/config.py``).

Each switch has a default, an environment variable read once (at the first use
of any switch), a setter for the rest of the process and a thread-local context
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


def _bump() -> None:
    generation[0] += 1


def _read_environment() -> None:
    """Read the environment once: the first call of any getter."""
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


def _stack(kind: str) -> list:
    stack = getattr(_local, kind, None)
    if stack is None:
        stack = []
        setattr(_local, kind, stack)
    return stack


@contextlib.contextmanager
def _pushed(kind: str, value) -> Iterator[None]:
    stack = _stack(kind)
    stack.append(value)
    try:
        yield
    finally:
        stack.pop()


# ------------------------------------------------------------------ backends
def backend() -> str:
    """The HetConv backend name in force for layers without their own ``backend=``."""
    stack = _stack("backend")
    if stack:
        return stack[-1]
    if _settings.benchmark is None:
        _read_environment()
    return _settings.backend


def dispatch_state(op: str) -> tuple:
    """What a layer's remembered plan depends on besides its input, in one call:
    (backend name in force for ``op``, measuring on?). The hot path of every call."""
    local = _local.__dict__
    stack = local.get("backend" if op == "hetconv" else "depthwise_backend")
    measuring = local.get("benchmark")
    if _settings.benchmark is None:
        _read_environment()
    name = stack[-1] if stack else (_settings.backend if op == "hetconv" else _settings.depthwise_backend)
    return name, measuring[-1] if measuring else _settings.benchmark


def backend_source() -> str:
    """Where :func:`backend` comes from (for error messages)."""
    if _stack("backend"):
        return "leanconv.use_backend"
    backend()
    return _settings.sources["backend"]


def set_backend(name: str) -> None:
    """Set the process-wide HetConv backend (``"auto"`` restores the rule)."""
    backend()
    _settings.backend, _settings.sources["backend"] = name, "leanconv.config.set_backend"
    _bump()


def use_backend(name: str):
    """``with leanconv.use_backend("reference"): ...``: the HetConv backend of every
    layer without its own ``backend=`` inside the block (thread-local, nestable)."""
    return _pushed("backend", name)


def depthwise_backend() -> str:
    """The depthwise backend name in force for layers without their own ``backend=``."""
    stack = _stack("depthwise_backend")
    if stack:
        return stack[-1]
    if _settings.benchmark is None:
        _read_environment()
    return _settings.depthwise_backend


def depthwise_backend_source() -> str:
    if _stack("depthwise_backend"):
        return "leanconv.config.use_depthwise_backend"
    depthwise_backend()
    return _settings.sources["depthwise_backend"]


def set_depthwise_backend(name: str) -> None:
    depthwise_backend()
    _settings.depthwise_backend = name
    _settings.sources["depthwise_backend"] = "leanconv.config.set_depthwise_backend"
    _bump()


def use_depthwise_backend(name: str):
    """Thread-local, nestable: the depthwise backend inside the block."""
    return _pushed("depthwise_backend", name)


# ----------------------------------------------------------------- measuring
def benchmark_enabled() -> bool:
    """Whether ``auto`` measures the candidates (off by default)."""
    stack = _stack("benchmark")
    if stack:
        return stack[-1]
    if _settings.benchmark is None:
        _read_environment()
    return _settings.benchmark


def set_benchmark(enabled: bool) -> None:
    """Turn measuring on or off for the process (like ``torch.backends.cudnn.benchmark``)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_benchmark: enabled must be True or False, got {enabled!r}")
    benchmark_enabled()
    _settings.benchmark = enabled
    _bump()


def benchmarking(enabled: bool = True):
    """``with leanconv.config.benchmarking(): ...``: measuring on (or off) inside the block."""
    if not isinstance(enabled, bool):
        raise TypeError(f"benchmarking: enabled must be True or False, got {enabled!r}")
    return _pushed("benchmark", enabled)


def benchmark_cache() -> str | None:
    """Path of the JSON file that keeps measured choices across processes, or None."""
    if _settings.benchmark is None:
        _read_environment()
    return _settings.benchmark_cache


def set_benchmark_cache(path: str | os.PathLike | None) -> None:
    benchmark_cache()
    _settings.benchmark_cache = None if path is None else os.fspath(path)
    _bump()


def _reset_for_tests() -> None:
    """Forget every setter and re-read the environment at the next use (tests only)."""
    with _lock:
        _settings.backend = _settings.depthwise_backend = _settings.benchmark = _settings.benchmark_cache = None
        _settings.sources = {}
    _bump()
