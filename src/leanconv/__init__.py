"""leanconv: exact, fast HetConv, depthwise-separable and blueprint-separable
convolutions for PyTorch, with model conversion and honest cost accounting.

Papers:
* HetConv, Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120
* MobileNets (DSC), Howard et al., 2017, https://arxiv.org/abs/1704.04861
* BSConv, Haase & Amthor, CVPR 2020, https://arxiv.org/abs/2003.13549
"""

from . import export, functional, models
from .accounting import count
from .conv_spec import make_conv, parse_conv_spec
from .convert import convert, load_converted
from .fuse import fuse
from .layers import (
    CONV_KINDS,
    BSConvS2d,
    BSConvU2d,
    DepthwiseConv2d,
    DSConv2d,
    GWPWConv2d,
    HetConv2d,
    SeedHetConv2d,
    orthonormal_penalty,
)
from .ops.backends import ENV_VAR, backend_names, use_backend

__version__ = "0.1.0"

__all__ = [
    "BSConvS2d",
    "BSConvU2d",
    "CONV_KINDS",
    "DSConv2d",
    "DepthwiseConv2d",
    "ENV_VAR",
    "GWPWConv2d",
    "HetConv2d",
    "SeedHetConv2d",
    "__version__",
    "backend_names",
    "convert",
    "count",
    "export",
    "functional",
    "fuse",
    "load_converted",
    "make_conv",
    "models",
    "orthonormal_penalty",
    "parse_conv_spec",
    "use_backend",
]
