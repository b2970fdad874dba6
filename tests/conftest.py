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
os.environ.pop("LEANCONV_BACKEND", None)


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
