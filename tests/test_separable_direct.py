"""The direct separable C++ kernels (DSC: depthwise then 1x1; BSConv-U: 1x1 then
depthwise) against the two convolutions they stand for: every ISA this CPU runs, awkward
shapes (stride 2, dilation, 5x5, valid and 'same' padding, odd sizes, channels and filters
that fill no whole vector, batch 1 and 64), both memory formats, the fused ReLU; the op's
registration (opcheck); and the layers' use of them (where the rule sends a call, never
under autograd, hooks or a depth multiplier; the cache follows weight updates)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn

import leanconv
from leanconv.ops import hetconv_direct, separable_direct
from helpers import assert_matches_reference

pytestmark = pytest.mark.skipif(not hetconv_direct.available(),
                                reason=f"direct kernel unavailable: {hetconv_direct.unavailable_reason()}")
CL = torch.channels_last

# (channels, filters, kernel, stride, padding, dilation, height, width, batch)
SHAPES = [
    (16, 32, 3, 1, 1, 1, 9, 7, 1),
    (20, 13, 3, 2, 1, 1, 11, 10, 3),      # stride 2; 20 channels, 13 filters: partial vectors
    (33, 70, 5, 1, 2, 1, 8, 9, 2),        # 5x5
    (8, 24, 3, 1, 2, 2, 10, 10, 1),       # dilation 2
    (7, 5, 3, 1, 0, 1, 5, 5, 4),          # valid padding, fewer channels than a vector
    (64, 64, 3, 1, 1, 1, 32, 32, 2),
    (512, 512, 3, 1, 1, 1, 2, 2, 1),      # a 2x2 map: every block touches the padding
    (24, 40, 3, 2, 1, 1, 7, 7, 64),       # batch 64
    (3, 17, 1, 1, 0, 1, 4, 6, 2),         # a 1x1 "depthwise" scale
]


def _weights(m, n, k, generator, pointwise_first=False):
    depth = n if pointwise_first else m
    return (torch.randn(depth, 1, k, k, generator=generator), torch.randn(depth, generator=generator),
            torch.randn(n, m, 1, 1, generator=generator), torch.randn(n, generator=generator))


@pytest.mark.parametrize("kind", ["dsc", "bsconv_u", "bsconv_s"])
@pytest.mark.parametrize("isa", hetconv_direct.ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_isa_kernel_matches_the_convolutions(shape, isa, kind):
    if isa not in hetconv_direct.runnable_isas():
        pytest.skip(f"this CPU does not run {isa}")
    m, n, k, stride, padding, dilation, h, w, batch = shape
    pointwise_first = kind != "dsc"
    generator = torch.Generator().manual_seed(0)
    first = None
    if kind == "bsconv_s":  # a first 1x1 into a bottleneck of about M/4 channels, then BSConv-U on it
        mid = max(2, m // 4 + 1)
        first = (torch.randn(mid, m, 1, 1, generator=generator), torch.randn(mid, generator=generator))
        dw, dw_bias, pw, pw_bias = _weights(mid, n, k, generator, True)
    else:
        dw, dw_bias, pw, pw_bias = _weights(m, n, k, generator, pointwise_first)
    geometry = ((k, k), (stride, stride), (padding, padding), (dilation, dilation))
    for biases in ((dw_bias, pw_bias), (None, None), (dw_bias, None), (None, pw_bias)):
        packed = separable_direct.pack(dw, biases[0], pw, biases[1], isa, pointwise_first=pointwise_first,
                                       first_pointwise=first)
        assert packed.isa == isa
        for memory_format in (CL, torch.contiguous_format):
            x = torch.randn(batch, m, h, w, generator=generator).contiguous(memory_format=memory_format)
            for relu in (False, True):
                expected = separable_direct.reference(
                    x.double(), dw.double(), _double(biases[0]), pw.double(), _double(biases[1]), *geometry[1:], relu,
                    pointwise_first=pointwise_first,
                    first_pointwise=None if first is None else (first[0].double(), first[1].double()))
                out = separable_direct.run(x, packed, *geometry, relu)
                assert out.is_contiguous(memory_format=memory_format)
                assert_matches_reference(out.double(), expected, what=f"{isa} relu={relu}")


def _double(t):
    return None if t is None else t.double()


def test_the_op_passes_opcheck():
    from torch.library import opcheck

    generator = torch.Generator().manual_seed(1)
    first = (torch.randn(5, 12, 1, 1, generator=generator), None)
    for kind in ("dsc", "bsconv_u", "bsconv_s"):
        pointwise_first = kind != "dsc"
        weights = _weights(5 if kind == "bsconv_s" else 12, 20, 3, generator, pointwise_first)
        packed = separable_direct.pack(*weights, pointwise_first=pointwise_first,
                                       first_pointwise=first if kind == "bsconv_s" else None)
        for memory_format in (CL, torch.contiguous_format):
            x = torch.randn(2, 12, 7, 9, generator=generator).contiguous(memory_format=memory_format)
            opcheck(torch.ops.leanconv.separable_direct_packed.default,
                    (x, packed.depthwise, packed.pointwise, packed.pointwise_bias, packed.depthwise_bias,
                     packed.first_pointwise, packed.first_pointwise_bias, 20, [3, 3], [2, 2], [1, 1], [1, 1],
                     pointwise_first, True, packed.isa))


def test_packed_for_another_width_is_refused_by_name():
    generator = torch.Generator().manual_seed(2)
    packed = separable_direct.pack(*_weights(16, 16, 3, generator), isa="portable")
    wider = [isa for isa in hetconv_direct.runnable_isas() if hetconv_direct.lanes(isa) != hetconv_direct.lanes("portable")]
    if not wider:
        pytest.skip("this CPU runs only the portable kernel")
    with pytest.raises(RuntimeError, match="does not match the input's channels and the ISA"):
        torch.ops.leanconv.separable_direct_packed(torch.randn(1, 16, 5, 5), packed.depthwise, packed.pointwise,
                                                   packed.pointwise_bias, packed.depthwise_bias, None, None, 16, [3, 3],
                                                   [1, 1], [1, 1], [1, 1], False, False, wider[0])


# ----------------------------------------------------------------------------- the layer
@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    original = separable_direct.run
    monkeypatch.setattr(separable_direct, "run", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    return calls


def _library_form(layer, x):
    """The layer's convolutions, as its forward runs them outside the kernel."""
    if isinstance(layer, leanconv.BSConvU2d):
        return layer.dw(layer.pw(x))
    if isinstance(layer, leanconv.BSConvS2d):
        return layer.dw(layer.pw2(layer.pw1(x)))
    return layer.pw(layer.dw(x))


@pytest.mark.parametrize("kind", [leanconv.DSConv2d, leanconv.BSConvU2d, leanconv.BSConvS2d],
                         ids=["dsc", "bsconv_u", "bsconv_s"])
@pytest.mark.parametrize("arguments", [
    dict(in_channels=16, out_channels=24, kernel_size=3, padding=1),
    dict(in_channels=10, out_channels=7, kernel_size=5, stride=2, padding="valid", bias=False),
    dict(in_channels=12, out_channels=12, kernel_size=3, padding="same", dilation=2),
], ids=["3x3", "5x5-stride2-valid", "same-dilated"])
def test_layer_runs_the_kernel_where_the_rule_says(kind, arguments, kernel_calls):
    torch.manual_seed(0)
    layer = kind(**arguments).eval()
    for batch, size in ((1, 13), (2, 9), (64, 6), (1, 64)):
        x = torch.randn(batch, arguments["in_channels"], size, size)
        before = len(kernel_calls)
        for inputs in (x.contiguous(memory_format=CL), x):
            with torch.inference_mode():
                out = layer(inputs)
            expected = _library_form(layer, inputs).detach()
            assert_matches_reference(out, expected)
            for memory_format in (CL, torch.contiguous_format):  # the format nn.Conv2d's would have
                assert out.is_contiguous(memory_format=memory_format) == expected.is_contiguous(memory_format=memory_format)
        sizes = list(expected.shape[2:])
        calls = int(separable_direct.pays(batch, *sizes)) + int(separable_direct.pays(batch, *sizes, channels_last=False))
        assert len(kernel_calls) - before == calls, (batch, size)
        assert not separable_direct.pays(batch, *sizes, channels_last=False) or batch == 1


def test_dsc_layer_keeps_the_two_convolutions_under_autograd_hooks_and_depth_multiplier(kernel_calls):
    torch.manual_seed(0)
    layer = leanconv.DSConv2d(8, 8, 3, padding=1).eval()
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=CL).requires_grad_()
    layer(x).sum().backward()  # autograd: the library form, with gradients
    assert x.grad is not None and not kernel_calls
    seen = []
    handle = layer.pw.register_forward_hook(lambda *args: seen.append(1))
    with torch.no_grad():
        layer(x)
    assert seen and not kernel_calls  # a hook on an inner convolution sees its call
    handle.remove()
    multiplier = leanconv.DSConv2d(8, 8, 3, padding=1, depth_multiplier=2).eval()
    with torch.no_grad():
        multiplier(x)
        layer(x)
    assert len(kernel_calls) == 1


def test_the_cache_follows_weight_updates_and_is_not_copied(kernel_calls):
    torch.manual_seed(0)
    layer = leanconv.DSConv2d(8, 12, 3, padding=1).eval()
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=CL)
    with torch.inference_mode():
        layer(x)
    with torch.no_grad():
        layer.pw.weight.mul_(-1)
        layer.dw.bias.add_(1)
    with torch.inference_mode():
        assert_matches_reference(layer(x), layer.pw(layer.dw(x)))
    assert "_direct_packed" in layer.__dict__
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert "_direct_packed" not in clone.__dict__
        with torch.inference_mode():
            assert_matches_reference(clone(x), layer(x))


def test_optimized_network_takes_the_kernels_with_their_activations(kernel_calls):
    torch.manual_seed(0)
    model = nn.Sequential(leanconv.DSConv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          leanconv.DSConv2d(16, 16, 3, padding=1), nn.ReLU6(),
                          leanconv.BSConvU2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.SiLU()).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2)
            module.running_mean.normal_()
    optimized, report = leanconv.optimize_for_inference(model, return_report=True)
    assert len(report.activations) == 3, str(report)
    x = torch.randn(1, 3, 10, 10)
    with torch.inference_mode():
        out = optimized(x.contiguous(memory_format=CL))
        assert len(kernel_calls) == 3
        assert_matches_reference(out, model(x))


# ------------------------------------------------------------ training without the depthwise output
def test_dsc_training_recomputes_the_depthwise_output_exactly(monkeypatch):
    """The backward pass computes the depthwise output again instead of keeping it (once per
    backward), the gradients equal the library form's, double backward stays exact; under a
    user's own saved-tensor hooks (checkpointing, offloading) nothing changes."""
    from leanconv.layers import _recompute

    recomputed = []
    original_call = _recompute._Recompute.__call__
    monkeypatch.setattr(_recompute._Recompute, "__call__", lambda self: recomputed.append(1) or original_call(self))
    torch.manual_seed(0)
    layer = leanconv.DSConv2d(6, 10, 3, padding=1, stride=2)
    plain = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, stride=2, groups=6), nn.Conv2d(6, 10, 1))
    plain[0].load_state_dict(layer.dw.state_dict())
    plain[1].load_state_dict(layer.pw.state_dict())
    for memory_format in (CL, torch.contiguous_format):
        x = torch.randn(3, 6, 9, 11).contiguous(memory_format=memory_format).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        before = len(recomputed)
        grads = torch.autograd.grad(layer(x).square().sum(), [x, *layer.parameters()], create_graph=True)
        assert len(recomputed) == before + 1
        expected = torch.autograd.grad(plain(x2).square().sum(), [x2, *plain.parameters()], create_graph=True)
        for got, want in zip(grads, expected):
            assert_matches_reference(got, want, what="gradient")
        second = torch.autograd.grad(grads[0].sum(), x)[0]  # double backward through the recomputation
        assert_matches_reference(second, torch.autograd.grad(expected[0].sum(), x2)[0], what="double backward")
    shapes = []
    before = len(recomputed)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        out = layer(x)
    out.sum().backward()
    assert len(recomputed) == before and tuple(layer.dw(x).shape) in shapes


def test_peak_training_memory_of_a_dsc_network_drops():
    """The depthwise outputs are not kept: a DSC network's training step peaks lower than
    with the library form's saving (measured by the profiler, as leanconv's benchmarks do)."""
    from leanconv.bench.memory import peak_allocated_bytes
    from leanconv.layers import _recompute

    torch.manual_seed(0)
    model = nn.Sequential(*[leanconv.DSConv2d(32, 32, 3, padding=1) for _ in range(4)])
    x = torch.randn(8, 32, 32, 32)

    def step():
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    recomputing = peak_allocated_bytes(step)
    usable = _recompute.recompute_usable
    _recompute.recompute_usable = lambda depthwise: False
    import leanconv.layers.separable as separable_module

    separable_module.recompute_usable = _recompute.recompute_usable
    try:
        keeping = peak_allocated_bytes(step)
    finally:
        _recompute.recompute_usable = usable
        separable_module.recompute_usable = usable
    one_map = x.numel() * x.element_size()
    assert recomputing <= keeping - 2 * one_map, (recomputing, keeping, one_map)
