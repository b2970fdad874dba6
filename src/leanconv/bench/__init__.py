"""Benchmark harness: interleaved timing with warm-up, medians and spread,
GMAC/s, peak training-step memory, a correctness gate against the reference,
a header naming machine/torch/threads/load, and results written atomically as
JSON, CSV, Markdown (and a plot with matplotlib).

``leanconv bench`` (``leanconv.commands.bench``) and ``benchmarks/*.py`` drive it.
"""

from .environment import describe_environment, machine_slug
from .layers import (
    GRIDS,
    LayerConfig,
    bench_hetconv_config,
    bench_layer_grid,
    bench_separable_config,
    layer_grid,
)
from .memory import peak_allocated_bytes
from .models import bench_models, build_variants, to_seed_form
from ..files import write_atomic  # re-exported for benchmarks/ scripts
from .report import markdown_table, read_results, write_results
from .timing import Timing, time_interleaved

__all__ = [
    "GRIDS",
    "LayerConfig",
    "Timing",
    "bench_hetconv_config",
    "bench_layer_grid",
    "bench_models",
    "bench_separable_config",
    "build_variants",
    "describe_environment",
    "layer_grid",
    "machine_slug",
    "markdown_table",
    "peak_allocated_bytes",
    "read_results",
    "time_interleaved",
    "to_seed_form",
    "write_atomic",
    "write_results",
]
