"""Implementations below the functional API: geometry, HetConv layouts, the
backends (reference, split, Triton launchers), the registry and the one
dispatch path.

Imports run one way: ``kernels`` -> ``ops`` -> ``functional`` -> ``layers`` ->
everything built on layers. Nothing here imports from higher up (only the
bottom-level ``leanconv.config`` and ``leanconv.files``).
"""

from . import backends as _builtin  # noqa: F401  (registers the built-in backends)
from .backends import hetconv_rule
from .dispatch import Dispatcher, dispatch_call, make_plan
from .hetconv_layout import (
    LAYOUTS,
    channel_permutation,
    convert_layout,
    extract_hetconv_weights,
    kxk_channel_index,
    materialize_dense_weight,
    pointwise_channel_index,
)
from .hetconv_split import zero_diagonal_pointwise
from .registry import (
    Backend,
    Plan,
    backend_names,
    ensure_ready,
    check_backend_name,
    get_backend,
    register_backend,
    set_backend,
    set_depthwise_backend,
    unregister_backend,
    use_backend,
    use_depthwise_backend,
)

__all__ = [
    "Backend",
    "Dispatcher",
    "LAYOUTS",
    "Plan",
    "backend_names",
    "channel_permutation",
    "check_backend_name",
    "convert_layout",
    "dispatch_call",
    "ensure_ready",
    "extract_hetconv_weights",
    "get_backend",
    "hetconv_rule",
    "kxk_channel_index",
    "make_plan",
    "materialize_dense_weight",
    "pointwise_channel_index",
    "register_backend",
    "set_backend",
    "set_depthwise_backend",
    "unregister_backend",
    "use_backend",
    "use_depthwise_backend",
    "zero_diagonal_pointwise",
]
