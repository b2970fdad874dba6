"""HetConv2d: every backend against the readable reference, the layouts against
the paper's definition, gradients, dtypes, awkward inputs and bad input."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import leanconv
from leanconv.functional import het_conv2d
from leanconv.ops.hetconv_layout import channel_permutation

from helpers import assert_lowp_policy, assert_matches_reference

EXACT_BACKENDS = ["reference", "split"]


def definition_dense_weight(layer: leanconv.HetConv2d) -> torch.Tensor:
    """The dense weight written straight from the paper's wording, one entry at a
    time, independent of leanconv's index tables."""
    n_out, m_in, p = layer.out_channels, layer.in_channels, layer.p
    kh, kw = layer.kernel_size
    dense = torch.zeros(n_out, m_in, kh, kw, dtype=layer.weight.dtype)
    for n in range(n_out):
        if layer.layout == "blocked":
            g = n // (n_out // p)
            own = [c for c in range(m_in) if g * (m_in // p) <= c < (g + 1) * (m_in // p)]
        else:
            own = [c for c in range(m_in) if (c - n) % p == 0]
        others = [c for c in range(m_in) if c not in own]
        for j, c in enumerate(own):
            dense[n, c] = layer.weight[n, j].detach()
        for k, c in enumerate(others):
            dense[n, c, kh // 2, kw // 2] = layer.pointwise_weight[n, k].detach()
    return dense


@dataclass(frozen=True)
class Case:
    m: int
    n: int
    p: int
    k: tuple = (3, 3)
    stride: tuple = (1, 1)
    padding: object = (1, 1)
    dilation: tuple = (1, 1)
    bias: bool = True
    padding_mode: str = "zeros"
    layout: str = "blocked"
    batch: int = 2
    hw: tuple = (7, 9)

    def __str__(self) -> str:
        return (
            f"M{self.m}-N{self.n}-P{self.p}-K{self.k[0]}x{self.k[1]}-s{self.stride[0]}{self.stride[1]}"
            f"-pad{self.padding}-d{self.dilation[0]}{self.dilation[1]}-{'b' if self.bias else 'nob'}"
            f"-{self.padding_mode}-{self.layout}-B{self.batch}-{self.hw[0]}x{self.hw[1]}"
        ).replace(" ", "").replace("'", "")

    def layer(self, backend=None, dtype=torch.float64) -> leanconv.HetConv2d:
        return leanconv.HetConv2d(
            self.m, self.n, self.k, self.stride, self.padding, self.dilation, self.bias, self.padding_mode,
            p=self.p, layout=self.layout, backend=backend, dtype=dtype,
        )

    def input(self, dtype=torch.float64) -> torch.Tensor:
        return torch.randn(self.batch, self.m, *self.hw, dtype=dtype)


CASES = [
    Case(8, 8, 1),
    Case(8, 16, 2),
    Case(8, 16, 4, layout="shifted"),
    Case(12, 6, 3, layout="shifted", bias=False),
    Case(16, 16, 16, hw=(5, 5)),  # P = M, the most extreme
    Case(16, 16, 16, layout="shifted", hw=(5, 5)),
    Case(8, 8, 4, k=(5, 5), padding=(2, 2)),
    Case(8, 12, 2, k=(3, 5), padding=(1, 2), layout="shifted"),
    Case(8, 8, 2, k=(1, 3), padding=(0, 1)),
    Case(8, 8, 4, stride=(2, 2), hw=(9, 8)),
    Case(8, 8, 4, stride=(2, 3), padding=(0, 2), hw=(10, 11), layout="shifted"),
    Case(8, 8, 2, dilation=(2, 1), padding=(2, 1)),
    Case(8, 8, 2, dilation=(2, 3), padding=(3, 0), stride=(1, 2), hw=(9, 13), layout="shifted"),
    Case(8, 8, 4, padding="same", dilation=(2, 2), hw=(8, 8)),
    Case(8, 8, 4, padding="valid", hw=(6, 7), layout="shifted"),
    Case(8, 8, 4, padding=(3, 0), hw=(5, 6)),  # padding wider than the kernel's half
    Case(8, 8, 2, padding_mode="reflect"),
    Case(8, 8, 4, padding_mode="replicate", layout="shifted", stride=(2, 1)),
    Case(8, 16, 4, padding_mode="circular", k=(3, 5), padding=(1, 2)),
    Case(8, 8, 4, batch=0),
    Case(8, 8, 2, batch=1, hw=(1, 1)),
    Case(6, 9, 3, batch=3, hw=(4, 3), layout="shifted", bias=False, stride=(2, 2), padding=(2, 1)),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_the_papers_definition(case):
    layer = case.layer(backend="reference")
    assert torch.equal(layer.dense_weight(), definition_dense_weight(layer))
    x = case.input()
    conv = nn.Conv2d(case.m, case.n, case.k, case.stride, case.padding, case.dilation, bias=case.bias,
                     padding_mode=case.padding_mode, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(definition_dense_weight(layer))
        if case.bias:
            conv.bias.copy_(layer.bias)
    assert_matches_reference(layer(x), conv(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", EXACT_BACKENDS + ["auto"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backend_forward_and_gradients_match_reference(case, backend):
    layer = case.layer(backend=backend)
    reference = case.layer(backend="reference")
    reference.load_state_dict(layer.state_dict())
    x = case.input().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out, out_ref = layer(x), reference(x_ref)
    assert_matches_reference(out, out_ref, atol=1e-12, rtol=1e-12)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    out_ref.backward(grad_out)
    assert_matches_reference(x.grad, x_ref.grad, atol=1e-12, rtol=1e-12, what="input grad")
    for (name, param), param_ref in zip(layer.named_parameters(), reference.parameters()):
        if param.numel() == 0:  # p=1 has no 1x1 kernels
            continue
        assert_matches_reference(param.grad, param_ref.grad, atol=1e-12, rtol=1e-12, what=f"{name} grad")
    assert layer.last_backend in leanconv.backend_names() and layer.last_backend != "auto"


@settings(max_examples=40, deadline=None)
@given(
    p=st.sampled_from([1, 2, 3, 4]),
    groups_in=st.integers(1, 3),
    groups_out=st.integers(1, 3),
    kh=st.sampled_from([1, 3, 5]),
    kw=st.sampled_from([1, 3]),
    sh=st.integers(1, 3),
    sw=st.integers(1, 2),
    dh=st.integers(1, 2),
    dw=st.integers(1, 2),
    ph=st.integers(0, 3),
    pw=st.integers(0, 2),
    h_extra=st.integers(0, 4),
    w_extra=st.integers(0, 4),
    batch=st.integers(0, 2),
    bias=st.booleans(),
    layout=st.sampled_from(["blocked", "shifted"]),
    padding_mode=st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]),
    channels_last=st.booleans(),
    backend=st.sampled_from(EXACT_BACKENDS),
)
def test_random_configurations_match_reference(
    p, groups_in, groups_out, kh, kw, sh, sw, dh, dw, ph, pw, h_extra, w_extra, batch, bias, layout,
    padding_mode, channels_last, backend,
):
    m, n = p * groups_in, p * groups_out
    # Big enough for the window, and for reflect padding (padding < size).
    h = max(dh * (kh - 1) + 1 - 2 * ph, ph + 1, 1) + h_extra
    w = max(dw * (kw - 1) + 1 - 2 * pw, pw + 1, 1) + w_extra
    args = dict(stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw), bias=bias, padding_mode=padding_mode,
                p=p, layout=layout, dtype=torch.float64)
    layer = leanconv.HetConv2d(m, n, (kh, kw), backend=backend, **args)
    reference = leanconv.HetConv2d(m, n, (kh, kw), backend="reference", **args)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(batch, m, h, w, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    out, out_ref = layer(x), reference(x)
    assert_matches_reference(out, out_ref, atol=1e-12, rtol=1e-12)
    if out.numel():
        (g_x,) = torch.autograd.grad(out, x, torch.ones_like(out))
        (g_ref,) = torch.autograd.grad(out_ref, x, torch.ones_like(out_ref))
        assert_matches_reference(g_x, g_ref, atol=1e-12, rtol=1e-12, what="input grad")


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
@pytest.mark.parametrize("layout", ["blocked", "shifted"])
def test_gradcheck_float64(backend, layout):
    layer = leanconv.HetConv2d(4, 4, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2), p=2, layout=layout,
                               backend=backend, dtype=torch.float64)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)

    def f(x, weight, pointwise, bias):
        return het_conv2d(x, weight, pointwise, bias, (2, 1), (1, 2), (1, 2), p=2, layout=layout, backend=backend)

    params = [t.detach().clone().requires_grad_() for t in (layer.weight, layer.pointwise_weight, layer.bias)]
    assert torch.autograd.gradcheck(f, (x, *params))


def test_unbatched_input_matches_batched():
    layer = leanconv.HetConv2d(8, 8, 3, padding=1, p=4, layout="shifted", dtype=torch.float64)
    x = torch.randn(8, 6, 5, dtype=torch.float64)
    assert_matches_reference(layer(x), layer(x.unsqueeze(0)).squeeze(0), atol=0, rtol=0)


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_non_contiguous_and_channels_last_inputs(backend):
    layer = leanconv.HetConv2d(8, 16, 3, padding=1, stride=2, p=4, backend=backend, dtype=torch.float64)
    big = torch.randn(2, 16, 11, 20, dtype=torch.float64)
    x = big[:, ::2, :, ::2]  # strided in channels and width
    assert not x.is_contiguous()
    expected = layer(x.contiguous())
    assert_matches_reference(layer(x), expected, atol=1e-12, rtol=1e-12)
    assert_matches_reference(layer(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-12, rtol=1e-12)
    transposed = torch.randn(2, 8, 9, 11, dtype=torch.float64).transpose(2, 3)
    assert_matches_reference(layer(transposed), layer(transposed.contiguous()), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_float32_within_tolerance_of_float64(backend):
    layer64 = leanconv.HetConv2d(16, 32, 3, padding=1, p=4, layout="shifted", dtype=torch.float64)
    layer32 = leanconv.HetConv2d(16, 32, 3, padding=1, p=4, layout="shifted", backend=backend)
    layer32.load_state_dict({k: v.float() for k, v in layer64.state_dict().items()})
    x = torch.randn(4, 16, 10, 10, dtype=torch.float64)
    assert layer32(x.float()).dtype == torch.float32
    assert_matches_reference(layer32(x.float()).double(), layer64(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_low_precision_follows_the_tolerance_policy(dtype, backend):
    layer64 = leanconv.HetConv2d(16, 16, 3, padding=1, p=4, dtype=torch.float64)
    layer = leanconv.HetConv2d(16, 16, 3, padding=1, p=4, backend=backend, dtype=dtype)
    layer.load_state_dict({k: v.to(dtype) for k, v in layer64.state_dict().items()})
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    x_low = x.to(dtype)
    ref64 = F.conv2d(x_low.double(), layer.dense_weight().double(), layer.bias.double(), padding=1)
    torch_lowp = F.conv2d(x_low, layer.dense_weight(), layer.bias, padding=1)
    out = layer(x_low)
    assert out.dtype == dtype
    assert_lowp_policy(out, torch_lowp, ref64)


def test_parameter_count_is_exactly_hetconvs():
    for m, n, p, k, bias in [(64, 128, 4, 3, True), (32, 32, 32, 3, False), (16, 8, 1, 5, True), (12, 24, 3, 3, True)]:
        layer = leanconv.HetConv2d(m, n, k, p=p, bias=bias)
        expected = n * (m // p * k * k + m - m // p) + (n if bias else 0)
        assert sum(t.numel() for t in layer.parameters()) == expected
        assert layer.weight.shape == (n, m // p, k, k)
        assert layer.pointwise_weight.shape == (n, m - m // p)


def test_initialisation_uses_the_real_fan_in():
    torch.manual_seed(1)
    layer = leanconv.HetConv2d(256, 256, 3, p=4)
    fan_in = 64 * 9 + 192
    bound = 1 / math.sqrt(fan_in)
    for tensor in (layer.weight, layer.pointwise_weight, layer.bias):
        assert tensor.abs().max().item() <= bound
        # uniform(-b, b) has std b/sqrt(3)
        assert abs(tensor.std().item() - bound / math.sqrt(3)) < 0.05 * bound


def test_device_and_dtype_reach_every_parameter():
    layer = leanconv.HetConv2d(8, 8, p=2, dtype=torch.float64, device="cpu")
    assert {t.dtype for t in layer.parameters()} == {torch.float64}
    assert layer.to_conv2d().weight.dtype == torch.float64


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
@pytest.mark.parametrize("layout", ["blocked", "shifted"])
def test_structure_stays_exact_through_training(optimizer_name, layout):
    torch.manual_seed(0)
    model = nn.Sequential(
        leanconv.HetConv2d(8, 16, 3, padding=1, p=4, layout=layout), nn.BatchNorm2d(16), nn.ReLU(),
        leanconv.HetConv2d(16, 16, 3, padding=1, stride=2, p=8, layout=layout),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    params = list(model.parameters())
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05)
    x, y = torch.randn(16, 8, 8, 8), torch.randint(0, 10, (16,))
    hetconvs = [m for m in model if isinstance(m, leanconv.HetConv2d)]
    counts_before = [sum(t.numel() for t in h.parameters()) for h in hetconvs]
    for _ in range(5):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    for layer, count in zip(hetconvs, counts_before):
        dense = layer.dense_weight().detach()
        pattern = definition_dense_weight(layer) != 0
        assert (dense[~pattern] == 0).all(), "a weight appeared outside HetConv's pattern"
        assert sum(t.numel() for t in layer.parameters()) == count
    state = model.state_dict()
    rebuilt = nn.Sequential(
        leanconv.HetConv2d(8, 16, 3, padding=1, p=4, layout=layout), nn.BatchNorm2d(16), nn.ReLU(),
        leanconv.HetConv2d(16, 16, 3, padding=1, stride=2, p=8, layout=layout),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    rebuilt.load_state_dict(state)
    model.eval(), rebuilt.eval()
    assert torch.equal(model(x), rebuilt(x))


def test_state_dict_keys_and_round_trip():
    layer = leanconv.HetConv2d(8, 16, 3, p=4)
    assert list(layer.state_dict()) == ["weight", "pointwise_weight", "bias"]
    other = leanconv.HetConv2d(8, 16, 3, p=4)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(1, 8, 5, 5)
    assert torch.equal(layer(x), other(x))
    with pytest.raises(RuntimeError):
        leanconv.HetConv2d(8, 16, 3, p=2).load_state_dict(layer.state_dict())


# ------------------------------------------------------------ weight import

@pytest.mark.parametrize("stride,dilation,k", [(1, 1, 3), (2, 1, 3), (1, 2, 5), ((2, 1), (1, 2), (3, 5))])
def test_from_approximate_equals_the_approximate_form(stride, dilation, k):
    torch.manual_seed(0)
    m, n, p = 12, 8, 4
    kh, kw = (k, k) if isinstance(k, int) else k
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    centre = (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
    gwc = torch.randn(n, m // p, kh, kw, dtype=torch.float64)
    pwc = torch.randn(n, m, 1, 1, dtype=torch.float64)
    gwc_bias, pwc_bias = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    x = torch.randn(2, m, 11, 10, dtype=torch.float64)
    approximate = (
        F.conv2d(x, gwc, gwc_bias, stride, centre, dilation, groups=p) + F.conv2d(x, pwc, pwc_bias, stride)
    )
    layer = leanconv.HetConv2d.from_approximate(gwc, pwc, gwc_bias, pwc_bias, stride=stride, dilation=dilation)
    assert layer.p == p and layer.layout == "blocked"
    assert_matches_reference(layer(x), approximate, atol=1e-12, rtol=1e-12)
    approximate_params = gwc.numel() + pwc.numel() + n
    assert sum(t.numel() for t in layer.parameters()) == approximate_params - n * m // p


def test_from_approximate_refuses_misaligned_padding():
    with pytest.raises(ValueError, match="centre offset"):
        leanconv.HetConv2d.from_approximate(torch.randn(4, 2, 3, 3), torch.randn(4, 4, 1, 1), padding=0)


@pytest.mark.parametrize("source", ["shifted", "blocked"])
def test_layout_conversion_is_the_stated_permutation(source):
    torch.manual_seed(0)
    m, n, p = 12, 8, 4
    layer = leanconv.HetConv2d(m, n, 3, padding=1, p=p, layout=source, dtype=torch.float64)
    target = "blocked" if source == "shifted" else "shifted"
    converted = layer.to_layout(target)
    assert converted.layout == target
    sigma_in, sigma_out = channel_permutation(m, p), channel_permutation(n, p)
    x = torch.randn(2, m, 6, 6, dtype=torch.float64)
    if source == "shifted":
        x_converted = torch.empty_like(x)
        x_converted[:, sigma_in] = x  # blocked channel sigma(c) carries shifted channel c
        assert_matches_reference(converted(x_converted)[:, sigma_out], layer(x), atol=1e-12, rtol=0)
    else:
        x_converted = x[:, sigma_in]
        assert_matches_reference(converted(x_converted), layer(x)[:, sigma_out], atol=1e-12, rtol=0)
    back = converted.to_layout(source)
    for a, b in zip(back.parameters(), layer.parameters()):
        assert torch.equal(a, b)


def test_from_dense_round_trip_and_refusal():
    layer = leanconv.HetConv2d(8, 8, 3, padding=1, p=2, layout="shifted")
    rebuilt = leanconv.HetConv2d.from_dense(layer.dense_weight().detach(), layer.bias.detach(), padding=1, p=2,
                                            layout="shifted")
    x = torch.randn(1, 8, 5, 5)
    assert torch.equal(rebuilt(x), layer(x))
    dense = layer.dense_weight().detach().clone()
    dense[0, 1, 0, 0] = 1.0  # channel 1 has a 1x1 kernel in filter 0 (shifted, P=2)
    with pytest.raises(ValueError, match="not a shifted HetConv weight"):
        leanconv.HetConv2d.from_dense(dense, p=2, layout="shifted")


def test_p_equal_one_is_a_standard_convolution():
    layer = leanconv.HetConv2d(6, 10, 3, padding=1, p=1, dtype=torch.float64)
    conv = layer.to_conv2d()
    assert torch.equal(conv.weight, layer.weight)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    assert_matches_reference(layer(x), conv(x), atol=1e-12, rtol=0)


# ---------------------------------------------------------- backend choice

def test_backend_precedence_argument_context_setter_environment(leanconv_env):
    layer = leanconv.HetConv2d(8, 8, 3, padding=1, p=4)
    x = torch.randn(1, 8, 5, 5)
    assert layer.requested_backend == "auto"
    leanconv_env("LEANCONV_BACKEND", "split")
    assert layer.requested_backend == "split"
    layer(x)
    assert layer.last_backend == "split"
    leanconv.set_backend("reference")  # the setter beats the environment
    layer(x)
    assert layer.last_backend == "reference"
    with leanconv.use_backend("split"):  # the context beats the setter
        assert layer.requested_backend == "split"
        with leanconv.use_backend("reference"):
            layer(x)
            assert layer.last_backend == "reference"
        layer(x)
        assert layer.last_backend == "split"
        layer.backend = "reference"  # the argument beats everything
        layer(x)
        assert layer.last_backend == "reference"
    leanconv_env("LEANCONV_BACKEND", "fastest")
    layer.backend = None
    with pytest.raises(ValueError, match="LEANCONV_BACKEND"):
        layer(x)
    with pytest.raises(ValueError, match="set_backend: name must be one of"):
        leanconv.set_backend("fastest")


def test_auto_picks_only_exact_backends_on_random_shapes():
    torch.manual_seed(3)
    for _ in range(10):
        p = int(torch.randint(1, 5, ()).item())
        m, n = p * int(torch.randint(1, 5, ()).item()), p * int(torch.randint(1, 5, ()).item())
        layer = leanconv.HetConv2d(m, n, 3, padding=1, p=p, dtype=torch.float64)
        x = torch.randn(2, m, 6, 6, dtype=torch.float64)
        out = layer(x)
        assert layer.last_backend in ("reference", "split")
        assert_matches_reference(out, F.conv2d(x, layer.dense_weight(), layer.bias, padding=1), atol=1e-12, rtol=0)


def test_extra_repr_shows_non_defaults_only():
    assert repr(leanconv.HetConv2d(8, 16, p=4)) == "HetConv2d(8, 16, kernel_size=(3, 3), stride=(1, 1), p=4)"
    text = repr(leanconv.HetConv2d(8, 16, 5, 2, "valid", 2, False, "reflect", p=2, layout="shifted", backend="split"))
    for part in ["kernel_size=(5, 5)", "stride=(2, 2)", "padding='valid'", "dilation=(2, 2)", "bias=False",
                 "padding_mode='reflect'", "p=2", "layout='shifted'", "backend='split'"]:
        assert part in text


# --------------------------------------------------------------- bad input

@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(p=0), ValueError, "p must be >= 1"),
        (dict(p=-2), ValueError, "p must be >= 1"),
        (dict(p=3), ValueError, "p must divide in_channels"),
        (dict(p=2.0), TypeError, "p must be an int"),
        (dict(p=2, kernel_size=4), ValueError, "kernel_size must be odd"),
        (dict(p=2, kernel_size=(3, 2)), ValueError, "kernel_size must be odd"),
        (dict(p=2, groups=2), ValueError, "groups=1"),
        (dict(p=2, backend="fast"), ValueError, "backend must be one of"),
        (dict(p=2, layout="diagonal"), ValueError, "layout must be one of"),
        (dict(p=2, padding_mode="mirror"), ValueError, "padding_mode must be one of"),
        (dict(p=2, padding="full"), ValueError, "padding must be"),
        (dict(p=2, padding="same", stride=2), ValueError, "not supported for strided"),
        (dict(p=2, stride=0), ValueError, "stride must be >= 1"),
        (dict(p=2, padding=-1), ValueError, "padding must be >= 0"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        leanconv.HetConv2d(8, 12, **kwargs)


def test_p_must_divide_out_channels():
    with pytest.raises(ValueError, match="p must divide out_channels"):
        leanconv.HetConv2d(8, 6, p=4)


def test_forward_rejects_wrong_channels_and_rank():
    layer = leanconv.HetConv2d(8, 8, p=2)
    with pytest.raises(ValueError, match="expected input with 8 channels.*got 6"):
        layer(torch.randn(1, 6, 5, 5))
    with pytest.raises(ValueError, match="3-D .* or 4-D"):
        layer(torch.randn(1, 1, 8, 5, 5))
    with pytest.raises(ValueError, match="3-D .* or 4-D"):
        layer(torch.randn(8, 5))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([[1.0]])


def test_functional_validates_weight_shapes():
    x = torch.randn(1, 8, 5, 5)
    with pytest.raises(ValueError, match="pointwise_weight must have shape"):
        het_conv2d(x, torch.randn(4, 2, 3, 3), torch.randn(4, 5), p=4)
    with pytest.raises(ValueError, match="expected input with 8 channels"):
        het_conv2d(torch.randn(1, 6, 5, 5), torch.randn(4, 2, 3, 3), torch.randn(4, 6), p=4)


def test_index_tables_carry_the_mark_of_assume_constant_result():
    """ops/hetconv_layout.py marks its table function without importing TorchDynamo;
    the public decorator must still set exactly that mark. (Also: compiling a shifted
    HetConv, which reads the tables, gives one graph without breaks.)"""
    from leanconv.ops import hetconv_layout

    def probe():
        return None

    torch.compiler.assume_constant_result(probe)
    assert set(vars(probe)) == {"_dynamo_marked_constant"} and probe._dynamo_marked_constant is True
    assert hetconv_layout._tables._dynamo_marked_constant is True

    layer = leanconv.HetConv2d(8, 8, 3, padding=1, p=4, layout="shifted", backend="split")
    explained = torch._dynamo.explain(layer)(torch.randn(1, 8, 5, 5))
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("channels,p", [(8, 2), (12, 4), (6, 6)])
def test_the_split_forms_traceable_group_order_is_the_layouts(channels, p):
    from leanconv.ops.hetconv_layout import group_channel_order, group_filter_order
    from leanconv.ops.hetconv_split import _shifted_group_order

    assert torch.equal(_shifted_group_order(channels, p, "cpu"), group_channel_order(channels, channels, p, "shifted"))
    order = group_filter_order(channels, channels, p, "shifted")
    assert torch.equal(_shifted_group_order(channels, channels // p, "cpu"), torch.argsort(order))


def test_the_former_name_of_the_approximate_form_still_resolves_with_a_warning():
    import leanconv.layers

    with pytest.warns(DeprecationWarning, match="now ApproximateHetConv2d"):
        assert leanconv.SeedHetConv2d is leanconv.ApproximateHetConv2d
    with pytest.warns(DeprecationWarning):
        assert leanconv.layers.SeedHetConv2d is leanconv.ApproximateHetConv2d
    with pytest.raises(AttributeError, match="no attribute 'NoSuchLayer'"):
        leanconv.layers.NoSuchLayer
