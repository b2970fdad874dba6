"""leanconv's nn.Modules: HetConv2d and the separable family, and the factory
that builds any of them from nn.Conv2d-style arguments."""

# The kinds in the order their names are listed (each registers itself on definition).
from .hetconv import Conv2dReLU, HetConv2d  # isort: skip
from .separable import DSConv2d, GWPWConv2d  # isort: skip
from .blueprint import BSConvS2d, BSConvU2d, bsconv_s_mid_channels, orthonormal_penalty  # isort: skip
from .approximate import ApproximateHetConv2d
from . import conv_spec as _registry
from .conv_spec import check_kind_options
from .depthwise import DepthwiseConv2d
from .factory import make_conv
from .hetconv_export import HetConvExportForm
from .prepacked import PrepackedConv2d
from .protocol import LeanConvLayer

# Every leanconv layer kind, for isinstance checks: model surgery treats each as one unit
# (convert never replaces what is inside one, fuse folds BN into each whole). A kind is
# one by deriving from LeanConvLayer, whose protocol the rest of leanconv asks.
LEANCONV_LAYERS = (LeanConvLayer,)

__all__ = [
    "BSConvS2d",
    "BSConvU2d",
    "CONV_KINDS",
    "DSConv2d",
    "DepthwiseConv2d",
    "GWPWConv2d",
    "HetConv2d",
    "HetConvExportForm",
    "KIND_OPTIONS",
    "LEANCONV_LAYERS",
    "LeanConvLayer",
    "PrepackedConv2d",
    "Conv2dReLU",
    "ApproximateHetConv2d",
    "bsconv_s_mid_channels",
    "check_kind_options",
    "make_conv",
    "orthonormal_penalty",
]


def __getattr__(name: str):
    """``SeedHetConv2d``, the former name of :class:`ApproximateHetConv2d`, still resolves
    (with a DeprecationWarning) so that code written against it keeps running."""
    if name in ("CONV_KINDS", "KIND_OPTIONS"):  # the kinds registered now
        return getattr(_registry, name)
    if name == "SeedHetConv2d":
        import warnings

        warnings.warn("SeedHetConv2d is now ApproximateHetConv2d (one name for the approximate HetConv form)",
                      DeprecationWarning, stacklevel=2)
        return ApproximateHetConv2d
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
