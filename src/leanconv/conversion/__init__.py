"""Model conversion: swap a network's dense convolutions for HetConv, DSC,
BSConv-U/S or GWC+PWC, report what that saves, save and rebuild the result.

* :mod:`.pipeline`: ``convert(model, kind)`` as named steps (find candidates,
  decide with a reason, build, compare cost, transfer, place, report);
* :mod:`.transfer`: weight transfer from the dense weights in bounded memory;
* :mod:`.report`: the :class:`ConversionReport`;
* :mod:`.checkpoint`: ``save_converted`` / ``load_converted``.

``leanconv.convert`` is the function; this package is reached as
``from leanconv.conversion import load_converted`` (or ``leanconv.load_converted``).
"""

from .checkpoint import CHECKPOINT_FORMAT, build_source, load_callable, load_converted, save_converted
from .pipeline import P_POLICIES, convert
from .report import ConversionReport, ReplacedLayer, SkippedLayer
from .transfer import transfer_weights

__all__ = [
    "CHECKPOINT_FORMAT",
    "ConversionReport",
    "P_POLICIES",
    "ReplacedLayer",
    "SkippedLayer",
    "build_source",
    "convert",
    "load_callable",
    "load_converted",
    "save_converted",
    "transfer_weights",
]
