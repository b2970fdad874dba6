"""The contract with ``nn.Conv2d``, as a property: over random constructor arguments
and input shapes, every leanconv layer kind refuses what ``nn.Conv2d`` refuses (with
an error, never an empty or wrong-sized output) and otherwise returns a tensor of the
same shape and dtype.

Arguments that a kind itself restricts (HetConv's odd kernel and P dividing the
channels, GWC+PWC's groups dividing the input channels, ApproximateHetConv2d's padding of
at least the centre offset) are drawn inside those rules; everything else (padding modes, 'same'/'valid', stride, dilation, inputs
smaller than the dilated kernel, unbatched inputs, batch 0) is drawn freely.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import leanconv
from leanconv.layers import DepthwiseConv2d, ApproximateHetConv2d

ERRORS = (ValueError, TypeError, RuntimeError)


def _divisor(draw, n: int) -> int:
    return draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))


@st.composite
def conv_settings(draw, kind: str):
    odd_kernel = kind in ("hetconv", "seed_hetconv")
    in_channels = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    out_channels = draw(st.sampled_from([1, 2, 4, 6, 8]))
    if kind == "depthwise":
        out_channels = in_channels * draw(st.sampled_from([1, 2]))
    kernel = draw(st.tuples(st.sampled_from([1, 3, 5] if odd_kernel else [1, 2, 3, 5]),
                            st.sampled_from([1, 3] if odd_kernel else [1, 2, 3])))
    stride = draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))
    dilation = draw(st.tuples(st.integers(1, 2), st.integers(1, 2)))
    padding = draw(st.one_of(st.tuples(st.integers(0, 2), st.integers(0, 2)), st.sampled_from(["same", "valid"])))
    arguments = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation,
                     bias=draw(st.booleans()), padding_mode=draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"])))
    extra = {}
    if kind == "seed_hetconv":  # its 1x1 branch reads the window's centre: padding is at least that offset
        arguments["padding"] = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    if kind in ("hetconv", "seed_hetconv"):
        common = [d for d in range(1, min(in_channels, out_channels) + 1) if in_channels % d == 0 and out_channels % d == 0]
        extra["p"] = draw(st.sampled_from(common))
    elif kind == "gwpw":
        extra["groups"] = _divisor(draw, in_channels)
    elif kind == "bsconv_s":
        extra["p"] = draw(st.sampled_from([0.25, 0.5, 1.0]))
    batch = draw(st.sampled_from([None, 0, 1, 2]))
    size = draw(st.tuples(st.integers(1, 7), st.integers(1, 7)))
    return in_channels, out_channels, arguments, extra, batch, size


BUILDERS = {
    "hetconv": leanconv.HetConv2d,
    "seed_hetconv": ApproximateHetConv2d,
    "dsc": leanconv.DSConv2d,
    "gwpw": leanconv.GWPWConv2d,
    "bsconv_u": leanconv.BSConvU2d,
    "bsconv_s": leanconv.BSConvS2d,
    "depthwise": DepthwiseConv2d,
}


def _outcome(build, x):
    """("error", type) or ("ok", shape, dtype) of building a layer and calling it on ``x``."""
    try:
        layer = build()
    except ERRORS as error:
        return ("construct-error", type(error).__name__)
    try:
        with torch.no_grad():
            out = layer.eval()(x)
    except ERRORS as error:
        return ("call-error", type(error).__name__)
    return ("ok", tuple(out.shape), out.dtype)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_layers_keep_nn_conv2d_contract(kind):
    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(conv_settings(kind))
    def check(drawn):
        in_channels, out_channels, arguments, extra, batch, size = drawn
        shape = (in_channels, *size) if batch is None else (batch, in_channels, *size)
        x = torch.randn(shape)
        groups = {"groups": in_channels} if kind == "depthwise" else {}
        expected = _outcome(lambda: nn.Conv2d(in_channels, out_channels, **arguments, **groups), x)
        got = _outcome(lambda: BUILDERS[kind](in_channels, out_channels, **arguments, **extra), x)
        if expected[0] == "ok":
            assert got == expected, f"{kind}({in_channels}, {out_channels}, {arguments}, {extra}) on {shape}"
        else:
            assert got[0] != "ok", (f"nn.Conv2d refuses {arguments} on {shape} ({expected}); "
                                    f"{kind} returned {got}")

    check()


@pytest.mark.parametrize("build", [
    lambda: leanconv.HetConv2d(4, 4, 3, p=2),
    lambda: leanconv.HetConv2d(4, 4, 3, dilation=2, padding=1, p=2, backend="reference"),
    lambda: DepthwiseConv2d(4, 4, 3),
    lambda: leanconv.DSConv2d(4, 4, 3),
], ids=["hetconv", "hetconv-dilated", "depthwise", "dsc"])
def test_input_smaller_than_the_kernel_is_an_error_naming_both_sizes(build):
    with pytest.raises(ValueError, match=r"smaller than the dilated kernel"):
        build()(torch.randn(2, 4, 2, 2))


def test_bsconv_s_refuses_an_empty_bottleneck():
    with pytest.raises(ValueError, match=r"BSConvS2d: p must be a number in \(0, 1\]"):
        leanconv.BSConvS2d(64, 64, 3, p=0)
