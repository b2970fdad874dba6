"""What leanconv tells graph capture (TorchDynamo) about its own functions, without
importing TorchDynamo at ``import leanconv``."""

from __future__ import annotations

import sys

import torch

__all__ = ["assume_constant_result"]


def assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing TorchDynamo when
    leanconv is imported (that import costs ~1.2 s of every ``import leanconv`` and
    CLI start). The public decorator only marks ``fn`` with the attribute Dynamo
    reads when it traces; tests/test_hetconv.py checks that it still marks exactly
    this attribute. Once Dynamo is loaded, the public decorator is used."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn
