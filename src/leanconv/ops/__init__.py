"""Implementations below the functional API: geometry, HetConv layouts, the
reference and decomposed HetConv forms, and the backend registry.

Imports run one way: ``kernels`` -> ``ops`` -> ``functional`` -> ``layers`` ->
everything built on layers. Nothing here imports from higher up.
"""

from .backends import (
    ENV_VAR,
    HetConvBackend,
    backend_names,
    choose_backend,
    get_backend,
    register_backend,
    requested_backend,
    use_backend,
)
from .hetconv_layout import (
    LAYOUTS,
    channel_permutation,
    convert_layout,
    extract_hetconv_weights,
    kxk_channel_index,
    materialize_dense_weight,
    pointwise_channel_index,
)
from .hetconv_loop import hetconv_loop
from .hetconv_reference import hetconv_reference
from .hetconv_split import hetconv_split

__all__ = [
    "ENV_VAR",
    "HetConvBackend",
    "LAYOUTS",
    "backend_names",
    "channel_permutation",
    "choose_backend",
    "convert_layout",
    "extract_hetconv_weights",
    "get_backend",
    "hetconv_loop",
    "hetconv_reference",
    "hetconv_split",
    "kxk_channel_index",
    "materialize_dense_weight",
    "pointwise_channel_index",
    "register_backend",
    "requested_backend",
    "use_backend",
]
