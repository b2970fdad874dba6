"""Conv specs ("hetconv:p=4,layout=shifted"): defined in :mod:`leanconv.layers.conv_spec`
(below the layers' factory, which takes specs too); re-exported here for the code above layers. ``CONV_KINDS`` and ``KIND_OPTIONS`` are
read from the registry on every access, so a kind registered later is listed."""

from .layers import conv_spec as _registry
from .layers.conv_spec import (  # noqa: F401
    ConvSpec,
    check_kind_options,
    parse_conv_spec,
    parse_conv_specs,
    resolve_conv,
)

__all__ = [
    "CONV_KINDS", "KIND_OPTIONS", "ConvSpec", "check_kind_options", "parse_conv_spec", "parse_conv_specs", "resolve_conv",
]


def __getattr__(name: str):
    # CONV_KINDS and KIND_OPTIONS: the kinds registered now (a kind defined later joins them).
    if name in ("CONV_KINDS", "KIND_OPTIONS"):
        return getattr(_registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
