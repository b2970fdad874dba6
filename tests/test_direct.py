"""The ``direct`` C++ HetConv kernel against the readable reference: forward, every
gradient, fused ReLU, awkward shapes (partial filter tiles, odd group sizes,
strides, dilation, padding modes, tiny maps, empty batches), the layer cache and
``auto``'s choice. Float32 against float64 on the same values (the kernel runs
float32 only)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import leanconv
from leanconv.ops import hetconv_direct
from leanconv.ops.hetconv_layout import materialize_dense_weight

from helpers import assert_matches_reference

pytestmark = pytest.mark.skipif(not hetconv_direct.available(),
                                reason=f"direct kernel unavailable: {hetconv_direct.unavailable_reason()}")
CL = torch.channels_last


def reference_output(layer: leanconv.HetConv2d, x: torch.Tensor) -> torch.Tensor:
    """The layer's function in float64 through the reference backend (same float32 values)."""
    ref = leanconv.HetConv2d(**layer._same_arguments(backend="reference", dtype=torch.float64))
    ref.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    ref.set_activation(layer.activation)
    return ref(x.double())


def make(m, n, p, k=3, *, layout="blocked", bias=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    return leanconv.HetConv2d(m, n, k, p=p, layout=layout, bias=bias, backend="direct", **kwargs)


SHAPES = [
    # (M, N, P, K, stride, padding, dilation, H, W, batch): partial tiles, Ng of 1..40, 1-pixel maps
    (16, 16, 4, 3, 1, 1, 1, 7, 9, 2),
    (12, 36, 3, 3, 2, 1, 1, 5, 4, 3),
    (32, 96, 8, 5, 1, 2, 1, 6, 6, 1),
    (8, 24, 2, 3, 1, 0, 2, 6, 7, 2),
    (64, 64, 4, 3, 1, 1, 1, 2, 2, 3),
    (24, 80, 2, 3, (2, 1), (1, 0), (1, 2), 7, 6, 2),
    (40, 40, 5, (3, 1), 1, (1, 0), 1, 4, 5, 2),
    (6, 6, 3, 3, 1, 1, 1, 1, 1, 5),
    (64, 128, 4, 3, 2, 1, 1, 9, 9, 1),
    (32, 64, 8, 3, 1, 1, 1, 12, 13, 2),  # groups of 4 channels, 8 filters: interior blocks run all taps at once
    (24, 48, 4, 3, 2, 1, 2, 5, 6, 2),  # 2x2 output, strided and dilated: the KxK weight gradient tap by tap
]


FORMATS = [CL, torch.contiguous_format]


@pytest.mark.parametrize("memory_format", FORMATS, ids=["channels_last", "contiguous"])
@pytest.mark.parametrize("layout", ["blocked", "shifted"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_every_gradient_match_reference(shape, layout, memory_format):
    m, n, p, k, stride, padding, dilation, h, w, batch = shape
    layer = make(m, n, p, k, layout=layout, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(batch, m, h, w).contiguous(memory_format=memory_format).requires_grad_()
    out = layer(x)
    assert layer.last_backend == "direct" and out.is_contiguous(memory_format=memory_format)
    x64 = x.detach().double().requires_grad_()
    ref = leanconv.HetConv2d(**layer._same_arguments(backend="reference", dtype=torch.float64))
    ref.load_state_dict({key: v.double() for key, v in layer.state_dict().items()})
    out_ref = ref(x64)
    assert_matches_reference(out.double(), out_ref)
    grad = torch.randn_like(out_ref)
    out.backward(grad.float())
    out_ref.backward(grad)
    assert_matches_reference(x.grad.double(), x64.grad, what="input grad")
    for (name, param), param_ref in zip(layer.named_parameters(), ref.parameters()):
        assert_matches_reference(param.grad.double(), param_ref.grad, what=f"{name} grad")


@pytest.mark.parametrize("isa", hetconv_direct.ISAS)
@pytest.mark.parametrize("shape", SHAPES + [(16, 16, 4, 3, 1, 1, 1, 9, 11, 3), (32, 32, 4, 3, 1, 1, 1, 8, 8, 2),
                                           (64, 64, 2, 3, 1, 1, 1, 5, 7, 2)], ids=str)
def test_every_isa_kernel_this_cpu_runs_matches_reference(shape, isa):
    """Each ISA's code (the narrower ones forced on a wider host) against the reference,
    both layouts and memory formats, with and without the fused ReLU."""
    if isa not in hetconv_direct.runnable_isas():
        pytest.skip(f"this CPU does not run {isa}")
    m, n, p, k, stride, padding, dilation, h, w, batch = shape
    for layout in ("blocked", "shifted"):
        layer = make(m, n, p, k, layout=layout, stride=stride, padding=padding, dilation=dilation)
        for lane_loads in (True, False):  # permuted loads where they apply, and the group passes
            packed = hetconv_direct.pack(layer.weight, layer.pointwise_weight, m, p, layout, isa, lane_loads)
            assert packed.isa == isa and packed.centre.shape[-1] in (hetconv_direct.lanes(isa),
                                                                     2 * hetconv_direct.lanes(isa))
            for memory_format in FORMATS:
                x = torch.randn(batch, m, h, w).contiguous(memory_format=memory_format)
                expected = reference_output(layer, x)
                for relu in (False, True):
                    out = hetconv_direct._call(x, packed, layer.bias, layer._geometry, relu)
                    assert out.is_contiguous(memory_format=memory_format)
                    assert_matches_reference(out.double(), expected.relu() if relu else expected,
                                             what=f"{isa} {layout} lane_loads={lane_loads}")


@pytest.mark.parametrize("layout", ["blocked", "shifted"])
def test_vectors_of_several_groups_take_permuted_loads_on_every_vector_isa(layout):
    """Groups of 4 filters (16 channels, P=4) fill a quarter of an AVX-512 vector and half
    of an AVX2 one: such tiles run one pass of permuted loads, which the shape tests above
    (16 and 32 channels, P=4-8) then check against the reference in both formats."""
    for isa in (isa for isa in hetconv_direct.runnable_isas() if isa != "portable"):
        layer = make(16, 16, 4, layout=layout, padding=1)
        packed = hetconv_direct.pack(layer.weight, layer.pointwise_weight, 16, 4, layout, isa)
        assert packed.lane_index.numel() == packed.lane_offsets.numel() * hetconv_direct.lanes(isa) > 0
        assert packed.tile_passes.tolist() == list(range(packed.centre.shape[0] + 1))  # one pass a tile
    wide = make(64, 64, 4, padding=1)  # 16 filters a group: a vector holds one group, no permutes
    for isa in hetconv_direct.runnable_isas():
        if hetconv_direct.lanes(isa) <= 16:
            assert hetconv_direct.pack(wide.weight, wide.pointwise_weight, 64, 4, "blocked", isa).lane_index.numel() == 0


@pytest.mark.parametrize("isa", hetconv_direct.ISAS)
def test_relayout_copies_exactly_between_memory_formats(isa):
    """The blocked transposition behind NCHW calls: 8x8 register tiles and partial edges."""
    if isa not in hetconv_direct.runnable_isas():
        pytest.skip(f"this CPU does not run {isa}")
    module = hetconv_direct.load()
    for shape in [(2, 16, 32, 32), (3, 13, 7, 5), (1, 40, 9, 1), (2, 1, 4, 4), (0, 8, 3, 3), (1, 64, 1, 1)]:
        x = torch.randn(shape)
        cl = module.relayout(x, isa)
        assert cl.is_contiguous(memory_format=CL) and torch.equal(cl, x)
        back = module.relayout(x.contiguous(memory_format=CL), isa)
        assert torch.equal(back, x) and (back.is_contiguous() or x.numel() == 0)


def test_an_isa_the_cpu_lacks_or_does_not_know_is_refused_by_name():
    layer = make(8, 8, 2, padding=1)
    with pytest.raises(ValueError, match="isa must be one this CPU runs.*'sse9'"):
        hetconv_direct.pack(layer.weight, layer.pointwise_weight, 8, 2, "blocked", "sse9")
    packed = hetconv_direct.pack(layer.weight, layer.pointwise_weight, 8, 2, "blocked", "portable")
    with pytest.raises(RuntimeError, match="isa must be one of 'avx512', 'avx2', 'portable', got 'neon9'"):
        hetconv_direct.load().forward(torch.randn(1, 8, 4, 4), packed.centre, packed.others, packed.pass_groups,
                                      packed.tile_passes, packed.lane_offsets, packed.lane_index, None, 8, [3, 3], [1, 1], [1, 1], [1, 1], 2, False, False,
                                      "neon9")


FORCED = """
import os, torch, leanconv
from leanconv.ops import hetconv_direct
assert hetconv_direct.active_isa() == os.environ["EXPECT"], (hetconv_direct.active_isa(), os.environ["EXPECT"])
torch.manual_seed(0)
for fmt in (torch.channels_last, torch.contiguous_format):
    layer = leanconv.HetConv2d(24, 40, 3, p=4, padding=1, backend="direct")
    ref = leanconv.HetConv2d(24, 40, 3, p=4, padding=1, backend="reference")
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(3, 24, 9, 7).contiguous(memory_format=fmt).requires_grad_()
    out, out_ref = layer(x), ref(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    out.square().sum().backward()
    grads = [x.grad.clone(), layer.weight.grad, layer.pointwise_weight.grad]
    x.grad = None
    out_ref.square().sum().backward()
    for got, want in zip(grads, [x.grad, ref.weight.grad, ref.pointwise_weight.grad]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    with torch.inference_mode():
        torch.testing.assert_close(layer.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-4)
print("ok", hetconv_direct.active_isa())
"""


@pytest.mark.parametrize("setting", ["LEANCONV_CPU_ISA", "ATEN_CPU_CAPABILITY"])
@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_a_narrower_isa_forced_for_the_process_runs_layers_exactly(isa, setting, tmp_path):
    """LEANCONV_CPU_ISA, or torch's own ATEN_CPU_CAPABILITY, narrows the layers' kernel:
    forward, gradients and cached inference of a layer in a fresh process."""
    import os
    import subprocess
    import sys

    if isa not in hetconv_direct.runnable_isas():
        pytest.skip(f"this CPU does not run {isa}")
    env = {**os.environ, "EXPECT": isa}
    env.pop("LEANCONV_CPU_ISA", None)
    env.pop("ATEN_CPU_CAPABILITY", None)
    env[setting] = isa if setting == "LEANCONV_CPU_ISA" else {"avx2": "avx2", "portable": "default"}[isa]
    script = tmp_path / "forced.py"
    script.write_text(FORCED)
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"ok {isa}"


def test_an_isa_setting_this_cpu_cannot_run_is_refused_by_name(monkeypatch):
    saved = hetconv_direct.active_isa()
    hetconv_direct._state.pop("active")  # read again below
    try:
        monkeypatch.setenv("LEANCONV_CPU_ISA", "avx1024")
        with pytest.raises(ValueError, match="LEANCONV_CPU_ISA must be one of avx512, avx2, portable, got 'avx1024'"):
            hetconv_direct.active_isa()
    finally:
        hetconv_direct._state["active"] = saved


def test_nchw_calls_pack_permuted_loads_only_where_they_pay():
    """A layer's cached packing follows its input's format: permuted loads for channels-last
    input wherever they apply; for NCHW only from NCHW_LANE_LOADS_MIN_GROUPS groups a vector."""
    isa = hetconv_direct.active_isa()
    lanes = hetconv_direct.lanes(isa)
    for channels, p in [(16, 4), (32, 4), (32, 8), (64, 8)]:
        per_group = channels // p
        tile = hetconv_direct.tile_width(channels, isa)
        applies = hetconv_direct.lane_plan_lists(channels, channels, p, tile, lanes, "blocked") is not None
        layer = make(channels, channels, p, padding=1).eval()
        for memory_format in FORMATS:
            x = torch.randn(2, channels, 9, 7).contiguous(memory_format=memory_format)
            with torch.no_grad():
                out = layer(x)
            assert_matches_reference(out.double(), reference_output(layer, x))
            packed = next(entry.prepared for entry in layer._dispatcher.entries.values()
                          if isinstance(entry.prepared, hetconv_direct.DirectWeights)
                          and entry.plan.channels_last == (memory_format == CL))
            expected = applies and (memory_format == CL
                                    or lanes >= hetconv_direct.NCHW_LANE_LOADS_MIN_GROUPS * per_group)
            assert (packed.lane_index.numel() > 0) == expected, (channels, p, memory_format)


def test_nchw_calls_of_every_size_reuse_the_scratch_buffer_exactly():
    """The NCHW path's channels-last temporaries live in a buffer kept between calls: calls
    that grow it, then smaller and larger ones, all match the reference."""
    layer = make(16, 16, 4, padding=1).eval()  # permuted loads where the ISA has 16 lanes; 4x4 maps position-major
    with torch.no_grad():
        for batch, side in [(2, 4), (8, 16), (1, 3), (4, 4), (16, 12), (3, 2), (8, 16)]:
            x = torch.randn(batch, 16, side, side)
            out = layer(x)
            assert out.is_contiguous()
            assert_matches_reference(out.double(), reference_output(layer, x), what=f"{batch}x{side}x{side}")


@pytest.mark.parametrize("layout", ["blocked", "shifted"])
def test_cached_inference_matches_and_follows_weight_updates(layout):
    layer = make(32, 48, 4, layout=layout, padding=1).eval()
    x = torch.randn(3, 32, 6, 5).to(memory_format=CL)
    with torch.no_grad():
        assert_matches_reference(layer(x).double(), reference_output(layer, x))
        layer.weight.mul_(-2)  # in place: the packed weights must be rebuilt
        layer.bias.add_(1)     # the bias is read per call
        assert_matches_reference(layer(x).double(), reference_output(layer, x))
    assert layer.last_backend == "direct"


@pytest.mark.parametrize("training", [False, True])
def test_fused_relu_is_applied_once_in_every_mode(training):
    layer = make(16, 24, 4, padding=1)
    layer.set_activation("relu")
    x = torch.randn(2, 16, 5, 6).to(memory_format=CL).requires_grad_(training)
    with torch.set_grad_enabled(training):
        out = layer(x)
    expected = reference_output(layer, x.detach())  # the reference backend applies the ReLU after its conv
    assert (expected >= 0).all() and (expected == 0).any()
    assert_matches_reference(out.double(), expected)
    dense = materialize_dense_weight(layer.weight, layer.pointwise_weight, 4, "blocked")
    assert_matches_reference(expected, F.conv2d(x.detach().double(), dense.double(), layer.bias.double(), padding=1).relu())


def test_unbatched_empty_and_non_contiguous_inputs():
    layer = make(8, 16, 4, padding=1).eval()
    x = torch.randn(8, 5, 6)
    with torch.no_grad():
        cl = x.unsqueeze(0).to(memory_format=CL)
        assert_matches_reference(layer(cl).double(), reference_output(layer, cl))
        empty = torch.randn(0, 8, 5, 6).to(memory_format=CL)
        assert layer(empty).shape == (0, 16, 5, 6)
        # a view with gaps is read as a contiguous copy; a contiguous input as it is
        wide = torch.randn(2, 8, 5, 12).to(memory_format=CL)[..., ::2]
        assert_matches_reference(layer(wide).double(), reference_output(layer, wide.contiguous()))
        contiguous = torch.randn(2, 8, 5, 6)
        out = layer(contiguous)
        assert out.is_contiguous() and layer.last_backend == "direct"
        assert_matches_reference(out.double(), reference_output(layer, contiguous))


def test_auto_picks_direct_for_float32_cpu_in_either_format():
    layer = leanconv.HetConv2d(32, 32, 3, padding=1, p=4).eval()
    with torch.no_grad():
        for x in (torch.randn(2, 32, 8, 8).to(memory_format=CL), torch.randn(2, 32, 8, 8)):
            out = layer(x)
            assert layer.last_backend == "direct"
            assert out.is_contiguous(memory_format=CL) == x.is_contiguous(memory_format=CL)  # no layout copy
        layer.double()(torch.randn(2, 32, 8, 8, dtype=torch.float64).to(memory_format=CL))
        assert layer.last_backend != "direct"


def test_named_backend_refuses_what_it_cannot_run():
    layer = make(8, 8, 2, padding=1)
    with pytest.raises(ValueError, match="direct.*float32"):
        layer.double()(torch.randn(1, 8, 4, 4, dtype=torch.float64).to(memory_format=CL))


def test_transposed_parameters_give_the_input_gradient():
    """A HetConv's transpose is a HetConv with the same P and layout (kernels flipped)."""
    for layout in ("blocked", "shifted"):
        layer = make(12, 18, 3, layout=layout, padding=1).double()
        kxk, pointwise = hetconv_direct.transposed_parameters(layer.weight, layer.pointwise_weight, 12, 3, layout)
        dense = materialize_dense_weight(layer.weight, layer.pointwise_weight, 3, layout)
        dense_t = materialize_dense_weight(kxk, pointwise, 3, layout)
        torch.testing.assert_close(dense_t, dense.transpose(0, 1).flip(-1, -2), rtol=0, atol=0)


@settings(max_examples=30, deadline=None)
@given(
    p=st.sampled_from([2, 3, 4, 8]),
    groups_in=st.integers(1, 5),
    groups_out=st.integers(1, 11),
    kh=st.sampled_from([1, 3, 5]),
    kw=st.sampled_from([1, 3]),
    sh=st.integers(1, 3),
    sw=st.integers(1, 2),
    dh=st.integers(1, 2),
    ph=st.integers(0, 3),
    pw=st.integers(0, 2),
    extra=st.integers(0, 5),
    batch=st.integers(1, 3),
    bias=st.booleans(),
    layout=st.sampled_from(["blocked", "shifted"]),
    padding_mode=st.sampled_from(["zeros", "zeros", "reflect", "circular"]),
    memory_format=st.sampled_from(FORMATS),
)
def test_random_configurations_match_reference(p, groups_in, groups_out, kh, kw, sh, sw, dh, ph, pw, extra, batch,
                                               bias, layout, padding_mode, memory_format):
    m, n = p * groups_in, p * groups_out
    h = max(dh * (kh - 1) + 1 - 2 * ph, ph + 1, 1) + extra
    w = max(kw - 2 * pw, pw + 1, 1) + extra
    layer = make(m, n, p, (kh, kw), layout=layout, bias=bias, stride=(sh, sw), padding=(ph, pw), dilation=(dh, 1),
                 padding_mode=padding_mode)
    x = torch.randn(batch, m, h, w).contiguous(memory_format=memory_format).requires_grad_()
    out = layer(x)
    x64 = x.detach().double().requires_grad_()
    ref = leanconv.HetConv2d(**layer._same_arguments(backend="reference", dtype=torch.float64))
    ref.load_state_dict({key: v.double() for key, v in layer.state_dict().items()})
    out_ref = ref(x64)
    assert_matches_reference(out.double(), out_ref)
    (g,) = torch.autograd.grad(out, x, torch.ones_like(out))
    (g_ref,) = torch.autograd.grad(out_ref, x64, torch.ones_like(out_ref))
    assert_matches_reference(g.double(), g_ref, what="input grad")


def test_turned_off_it_is_named_unavailable_and_auto_uses_the_library_forms():
    import subprocess
    import sys

    code = (
        "import torch, leanconv\n"
        "layer = leanconv.HetConv2d(32, 32, 3, padding=1, p=4).eval()\n"
        "x = torch.randn(2, 32, 8, 8).to(memory_format=torch.channels_last)\n"
        "with torch.no_grad(): layer(x)\n"
        "print(layer.last_backend)\n"
        "try:\n"
        "    leanconv.HetConv2d(32, 32, 3, padding=1, p=4, backend='direct')(x)\n"
        "except ValueError as error: print(error)\n"
    )
    env = {**__import__("os").environ, "LEANCONV_DIRECT": "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    backend, error = result.stdout.strip().splitlines()
    assert backend in ("split", "reference")
    assert "'direct' cannot run this call" in error and "LEANCONV_DIRECT=0" in error


@pytest.mark.parametrize("training", [False, True])
def test_flop_counter_counts_the_direct_layer(training):
    """FlopCounterMode does not see C++ calls: under a dispatch mode the layer runs its
    library form, so the count is the split form's (HetConv's MACs + the 1x1 diagonal)."""
    from torch.utils.flop_counter import FlopCounterMode

    layer = make(16, 32, 4, padding=1).train(training)
    x = torch.randn(2, 16, 8, 8).to(memory_format=CL)
    with torch.set_grad_enabled(training):
        layer(x)  # the plan and the packed weights exist before counting
        with FlopCounterMode(display=False) as counter:
            out = layer(x)
    assert layer.last_backend == "direct"
    assert_matches_reference(out.detach().double(), reference_output(layer, x))
    macs = 2 * 8 * 8 * 32 * (4 * 9 + 16)  # split form: M/P*K^2 + M per output
    assert counter.get_total_flops() == 2 * macs


def test_tracing_with_direct_named_is_refused():
    """TorchScript tracing (and ONNX export) need standard operators; auto gives them split."""
    layer = make(8, 8, 2, padding=1).eval()
    x = torch.randn(1, 8, 4, 4).to(memory_format=CL)
    with pytest.raises(Exception, match="direct.*standard operators"):
        torch.jit.trace(layer, x)


# ------------------------------------------------------------- the registered torch ops
OP_CASES = [
    # (M, N, P, K, stride, padding, dilation, layout, channels_last, bias)
    (8, 12, 4, 3, 1, 1, 1, "blocked", False, True),
    (12, 6, 3, 3, 2, 1, 1, "shifted", True, False),
    (16, 16, 8, 5, 1, 4, 2, "blocked", True, True),
]


@pytest.mark.parametrize("m,n,p,k,stride,padding,dilation,layout,channels_last,bias", OP_CASES,
                         ids=["blocked-nchw", "shifted-cl-stride2", "dilated-cl"])
def test_registered_ops_pass_opcheck(m, n, p, k, stride, padding, dilation, layout, channels_last, bias):
    """Fake implementations, autograd registration and schemas, as torch.library checks them."""
    from torch.library import opcheck

    torch.manual_seed(0)
    x = torch.randn(2, m, 7, 6)
    if channels_last:
        x = x.to(memory_format=CL)
    weight = torch.randn(n, m // p, k, k, requires_grad=True)
    pointwise = torch.randn(n, m - m // p, requires_grad=True)
    b = torch.randn(n, requires_grad=True) if bias else None
    geometry = ([k, k], [stride, stride], [padding, padding], [dilation, dilation], p, layout)
    opcheck(torch.ops.leanconv.hetconv_direct.default, (x.requires_grad_(), weight, pointwise, b, *geometry))
    for isa in hetconv_direct.runnable_isas():
        opcheck(torch.ops.leanconv.hetconv_direct_pack.default, (weight.detach(), pointwise.detach(), m, p, layout, isa))
        packed = torch.ops.leanconv.hetconv_direct_pack(weight.detach(), pointwise.detach(), m, p, layout, isa)
        for relu in (False, True):
            opcheck(torch.ops.leanconv.hetconv_direct_packed.default,
                    (x.detach(), *packed, None if b is None else b.detach(), n, *geometry, relu, isa))
    out = torch.ops.leanconv.hetconv_direct(x, weight, pointwise, b, *geometry)
    opcheck(torch.ops.leanconv.hetconv_direct_backward.default,
            (torch.randn_like(out), x.detach(), weight.detach(), pointwise.detach(), *geometry, [True, True, True]))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.slow
def test_compiled_and_exported_graphs_keep_the_kernel(channels_last):
    """torch.export and torch.compile record the kernel's op (not the split form), and
    the compiled forward and backward match eager."""
    layer = make(32, 32, 4, padding=1)
    layer.backend = None  # auto's rule
    x = torch.randn(16, 32, 16, 16)  # above the small-call work, where training takes split
    if channels_last:
        x = x.to(memory_format=CL)
    with torch.no_grad():
        program = torch.export.export(layer.eval(), (x,))
        targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
        assert "leanconv.hetconv_direct_packed.default" in targets, targets
        assert not any("convolution" in t for t in targets), targets
        assert_matches_reference(program.module()(x), layer(x))
    graphs = []

    def keep_graph(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    layer.train()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=keep_graph)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = compiled(xc)
    expected = layer(xe)
    assert_matches_reference(out, expected)
    out.sum().backward()
    grads = [t.grad.clone() for t in (xc, layer.weight, layer.pointwise_weight)]
    layer.zero_grad()
    expected.sum().backward()
    for got, want in zip(grads, (xe.grad, layer.weight.grad, layer.pointwise_weight.grad)):
        assert_matches_reference(got, want, what="gradient")
    code = "\n".join(g.code for g in graphs)
    if channels_last:
        assert "leanconv.hetconv_direct" in code, code
    else:  # NCHW training on a 16x16 map of 32 channels keeps split by the rule: library convolutions
        assert "leanconv.hetconv_direct" not in code and "conv2d" in code, code
