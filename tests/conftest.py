"""Shared test configuration: deterministic seeding, no backend override leaking
in from the environment. Helpers live in tests/helpers.py."""

from __future__ import annotations

import importlib.util
import os

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when
# leanconv.kernels is first imported, which collection of any test module may
# trigger. Without a GPU the kernels must run under the interpreter, so this is
# set here, before any test module is imported.
if importlib.util.find_spec("triton") is not None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

torch.manual_seed(0)
for _variable in ("LEANCONV_BACKEND", "LEANCONV_DEPTHWISE_BACKEND", "LEANCONV_BENCHMARK", "LEANCONV_BENCHMARK_CACHE"):
    os.environ.pop(_variable, None)


@pytest.fixture(autouse=True)
def fresh_config():
    """Every test starts from leanconv's defaults (setters forgotten, the
    environment read again at first use, the built-in backends registered) and
    leaves nothing behind."""
    from leanconv import config
    from leanconv.ops import registry

    config._reset_for_tests()
    backends = {op: dict(entries) for op, entries in registry._REGISTRY.items()}
    yield
    for op, entries in backends.items():  # a test (or a README example) may register backends
        registry._REGISTRY[op].clear()
        registry._REGISTRY[op].update(entries)
    config._reset_for_tests()


@pytest.fixture
def leanconv_env(monkeypatch):
    """Set a leanconv environment variable as a new process would see it:
    ``leanconv_env("LEANCONV_BACKEND", "split")``."""
    from leanconv import config

    def set_variable(name: str, value: str) -> None:
        monkeypatch.setenv(name, value)
        config._reset_for_tests()

    return set_variable


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from more threads, and on a shared machine lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A generated CIFAR-10 folder: 80 training images (5 batches of 16), 24 test images."""
    from test_data import write_cifar10

    return write_cifar10(str(tmp_path_factory.mktemp("cifar")), per_batch=16, test=24)
