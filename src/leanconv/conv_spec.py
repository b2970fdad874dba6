"""Conv specs ("hetconv:p=4,layout=shifted"): defined in :mod:`leanconv.layers.conv_spec`
(below the layers' factory, which takes specs too); re-exported here for the code above layers."""

from .layers.conv_spec import (  # noqa: F401
    CONV_KINDS,
    KIND_OPTIONS,
    ConvSpec,
    check_kind_options,
    parse_conv_spec,
    parse_conv_specs,
    resolve_conv,
)

__all__ = [
    "CONV_KINDS", "KIND_OPTIONS", "ConvSpec", "check_kind_options", "parse_conv_spec", "parse_conv_specs", "resolve_conv",
]
