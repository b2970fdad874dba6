"""What the layers share: the constructor preamble (:func:`conv_arguments`), ``extra_repr``,
and the backend plumbing of the layers that dispatch (:class:`DispatchedLayer`)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import config
from ..ops.conv_geometry import PADDING_MODES, normalize_kernel_size, normalize_pair, normalize_padding
from ..ops.dispatch import Dispatcher
from ..ops.registry import check_backend_name


class DispatchedLayer:
    """Mixin of the layers that run through :mod:`leanconv.ops.dispatch`
    (``_OP``: the registry's op). The ``backend`` argument, the name in force, the
    backend that ran last, and a :class:`Dispatcher` that copies and pickles
    leave behind (it holds oneDNN-packed weights, which cannot be copied)."""

    _OP = "hetconv"

    def _check_backend(self, name: str | None) -> str | None:
        return check_backend_name(name, self._OP, f"{type(self).__name__}: backend")

    @property
    def backend(self) -> str | None:
        """The ``backend=`` argument (None: the configuration in force, see ``leanconv.config``)."""
        return self._backend

    @backend.setter
    def backend(self, name: str | None) -> None:
        self._backend = self._check_backend(name)

    @property
    def requested_backend(self) -> str:
        """The backend name in force now: argument, context, setter/environment or "auto"."""
        if self._backend is not None:
            return self._backend
        return config.backend() if self._OP == "hetconv" else config.depthwise_backend()

    @property
    def last_backend(self) -> str | None:
        """The backend that ran the last call (None before the first)."""
        dispatcher = self.__dict__.get("_dispatcher")
        return None if dispatcher is None else dispatcher.last_backend

    def _get_dispatcher(self) -> Dispatcher:
        dispatcher = self.__dict__.get("_dispatcher")
        if dispatcher is None:
            dispatcher = self.__dict__["_dispatcher"] = Dispatcher(self._OP, type(self).__name__)
        return dispatcher

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_dispatcher", None)
        return state

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self).__name__} cannot be compiled by torch.jit.script (its backends are Python). "
            "Use torch.jit.trace(model, example) or torch.export.export(model, (example,)) instead; "
            "both run every leanconv layer, and torch.onnx.export works with dynamo=True or False."
        )


@dataclass(frozen=True)
class ConvArguments:
    """nn.Conv2d's constructor arguments, validated and normalised once for every kind:
    pairs of ints, ``padding_pair`` the symmetric zero padding (None for an uneven
    ``"same"``, which only kinds that pass it to a depthwise or nn.Conv2d accept), and the
    ``factory`` keywords (``device``, ``dtype``) for every parameter."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: str | tuple[int, int]
    padding_pair: tuple[int, int] | None
    dilation: tuple[int, int]
    padding_mode: str
    factory: dict


def conv_arguments(layer: str, in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode,
                   device=None, dtype=None, *, odd_kernel: bool = False) -> ConvArguments:
    """Validate nn.Conv2d-style arguments up front, naming ``layer`` and the argument; the
    constructor preamble every leanconv layer shares (``odd_kernel``: a 1x1 kernel sits at
    the window's centre tap, which only odd sizes have)."""
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{layer}: {name} must be a positive int, got {value!r}")
    try:
        kernel = normalize_kernel_size(kernel_size, require_odd=odd_kernel)
        stride_pair, dilation_pair = normalize_pair(stride, "stride"), normalize_pair(dilation, "dilation")
        padding_pair = normalize_padding(padding, kernel, stride_pair, dilation_pair, allow_uneven_same=not odd_kernel)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{layer}: {error}") from None
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"{layer}: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    return ConvArguments(in_channels, out_channels, kernel, stride_pair, padding if isinstance(padding, str) else padding_pair,
                         padding_pair, dilation_pair, padding_mode, {"device": device, "dtype": dtype})


def describe_spatial(layer, spatial, has_bias: bool, extra: str) -> str:
    """extra_repr in nn.Conv2d's style: channels, kernel, stride, then non-defaults."""
    s = f"{layer.in_channels}, {layer.out_channels}, kernel_size={spatial.kernel_size}, stride={spatial.stride}"
    if spatial.padding != (0, 0):
        s += f", padding={spatial.padding!r}" if isinstance(spatial.padding, str) else f", padding={spatial.padding}"
    if spatial.dilation != (1, 1):
        s += f", dilation={spatial.dilation}"
    if not has_bias:
        s += ", bias=False"
    if spatial.padding_mode != "zeros":
        s += f", padding_mode={spatial.padding_mode!r}"
    return s + extra
