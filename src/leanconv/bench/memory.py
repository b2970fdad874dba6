"""Peak memory of one call (e.g. a training step), from the profiler's
allocation events: the highest total of bytes allocated and not yet freed
during the call, above what was live when it started. Counts every tensor the
CPU (or CUDA) allocator hands out, ATen's temporaries included."""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["peak_allocated_bytes"]


def peak_allocated_bytes(run: Callable[[], object], device: str = "cpu") -> int:
    """Peak bytes allocated above the starting level while ``run()`` executes."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak
