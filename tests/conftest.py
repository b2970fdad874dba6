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

import torch

torch.manual_seed(0)
os.environ.pop("LEANCONV_BACKEND", None)
