"""Time and peak memory of leanconv.convert's weight transfer on a VGG-style
conv-MLP head, 7x7, 512 -> 4096 (392 MiB of float32 weights), for every kind.

    .venv/bin/python scripts/measure_transfer.py

Peak memory: bytes the CPU allocator hands out during the transfer above the
level at its start (leanconv.bench.peak_allocated_bytes, from the profiler).
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from leanconv.bench import describe_environment, peak_allocated_bytes
from leanconv.conversion.pipeline import build
from leanconv.conversion.transfer import transfer_weights

KINDS = [("hetconv", dict(p=4)), ("dsc", {}), ("bsconv_u", {}), ("bsconv_s", {}), ("gwpw", dict(g=4))]


def main() -> None:
    print(", ".join(f"{k}={v}" for k, v in describe_environment().items()))
    torch.manual_seed(0)
    conv = nn.Conv2d(512, 4096, 7, padding=3)
    weight_bytes = conv.weight.numel() * conv.weight.element_size()
    for kind, options in KINDS:
        new = build(conv, kind, options)
        start = time.perf_counter()
        error = transfer_weights(conv, new)
        seconds = time.perf_counter() - start
        peak = peak_allocated_bytes(lambda: transfer_weights(conv, new))  # noqa: B023
        print(f"{kind:9s} {seconds:6.2f} s  peak {peak / 2**20:7.1f} MiB = {peak / weight_bytes:.2f} x the weight "
              f"({weight_bytes / 2**20:.0f} MiB)  relative weight error {error:.3f}", flush=True)


if __name__ == "__main__":
    main()
