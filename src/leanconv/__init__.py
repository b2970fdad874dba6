"""leanconv: exact, fast HetConv, depthwise-separable and blueprint-separable
convolutions for PyTorch, with model conversion and honest cost accounting.

Papers:
* HetConv, Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120
* MobileNets (DSC), Howard et al., 2017, https://arxiv.org/abs/1704.04861
* BSConv, Haase & Amthor, CVPR 2020, https://arxiv.org/abs/2003.13549
"""

from . import config, export, functional, layers, models
from .accounting import count
from .conv_spec import parse_conv_spec
from .conversion import convert, load_converted
from .fuse import fuse
from .inference import optimize_for_inference
from .layers import (
    BSConvS2d,
    BSConvU2d,
    DepthwiseConv2d,
    DSConv2d,
    GWPWConv2d,
    HetConv2d,
    ApproximateHetConv2d,
    make_conv,
    orthonormal_penalty,
)
from .ops.registry import backend_names, register_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = [
    "BSConvS2d",
    "BSConvU2d",
    "CONV_KINDS",
    "DSConv2d",
    "DepthwiseConv2d",
    "GWPWConv2d",
    "HetConv2d",
    "ApproximateHetConv2d",
    "__version__",
    "backend_names",
    "config",
    "convert",
    "count",
    "export",
    "functional",
    "fuse",
    "optimize_for_inference",
    "load_converted",
    "make_conv",
    "models",
    "orthonormal_penalty",
    "parse_conv_spec",
    "register_backend",
    "set_backend",
    "use_backend",
]


def __getattr__(name: str):
    """``CONV_KINDS`` (the kinds registered now) and ``SeedHetConv2d``, the former name of
    :class:`ApproximateHetConv2d` (with a DeprecationWarning)."""
    if name == "CONV_KINDS":
        return layers.CONV_KINDS
    if name == "SeedHetConv2d":
        import warnings

        warnings.warn("SeedHetConv2d is now ApproximateHetConv2d (one name for the approximate HetConv form)",
                      DeprecationWarning, stacklevel=2)
        return ApproximateHetConv2d
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
