"""Shared test configuration: deterministic seeding, no backend override leaking
in from the environment. Helpers live in tests/helpers.py."""

from __future__ import annotations

import os

import torch

torch.manual_seed(0)
os.environ.pop("LEANCONV_BACKEND", None)
