"""The ``triton`` HetConv backend against the ``reference`` backend.

Without a GPU the kernels run on CPU tensors under ``TRITON_INTERPRET=1``
(set by conftest.py before Triton is imported); shapes are tiny because the interpreter
executes every program instance in Python. Output and every gradient are
compared: float32 kernels use IEEE dots under the interpreter, so they are held
to the reference-path tolerance (tests/helpers.py); bfloat16 and float16 to the
low-precision policy against a float64 reference. On a CUDA machine the same
checks run on the GPU too (marked ``cuda``).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from helpers import assert_lowp_policy, assert_matches_reference, run_gpu_benchmark_smoke

HAS_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = [  # the Triton interpreter: slow on the CPU
    pytest.mark.slow,
    pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (pip install 'leanconv[triton]')"),
]

# TRITON_INTERPRET=1 is set by conftest.py on machines without CUDA, before
# any test module (which may import leanconv.kernels) is collected.

from leanconv.functional import het_conv2d  # noqa: E402
from leanconv import config  # noqa: E402
from leanconv.ops import backend_names, get_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 against the reference: 1e-5 under the interpreter (IEEE dots); on CUDA both sides use TF32 by
# default (the kernel follows torch.backends.cudnn.allow_tf32, as F.conv2d does), which rounds to ~1e-3.
FLOAT32_TOL = 1e-5 if DEVICE == "cpu" else 5e-3

# B, M, N, H, W, K, p, layout, stride, padding, dilation, bias, channels_last
CONFIGS = [
    pytest.param(2, 8, 8, 5, 5, 3, 4, "blocked", 1, 1, 1, True, True, id="blocked-k3-p4-nhwc"),
    pytest.param(2, 8, 12, 6, 7, 3, 4, "shifted", (2, 1), (1, 0), (1, 2), True, False, id="shifted-asym-nchw"),
    pytest.param(1, 6, 6, 7, 5, 5, 2, "shifted", (1, 2), 2, 1, False, True, id="shifted-k5-p2"),
    pytest.param(2, 4, 8, 4, 4, 1, 2, "blocked", 1, 0, 1, True, True, id="blocked-k1"),
    pytest.param(1, 12, 6, 6, 6, 3, 3, "blocked", 2, 0, 2, False, True, id="blocked-p3-s2-d2-nopad"),
    # stride phases of the input gradient: stride 3, a map smaller than the stride, padding past the reach
    pytest.param(1, 8, 8, 7, 8, 3, 2, "blocked", 3, 2, 1, True, True, id="blocked-s3-pad2"),
    pytest.param(2, 6, 6, 2, 3, 3, 3, "shifted", (3, 2), 1, (1, 2), False, False, id="shifted-map-under-stride"),
    pytest.param(1, 8, 8, 9, 9, 5, 4, "blocked", 2, 3, 2, True, True, id="blocked-k5-s2-d2-pad3"),
    # more channels and filters per group than one 16-wide interpreter tile: every loop takes several chunks
    pytest.param(1, 40, 36, 5, 4, 3, 2, "shifted", 1, 1, 1, True, True, id="shifted-multi-chunk"),
]


def _leaves(b, m, n, h, w, k, p, bias, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(b, m, h, w, generator=generator, dtype=torch.float64)
    weight = torch.randn(n, m // p, k, k, generator=generator, dtype=torch.float64)
    pointwise = torch.randn(n, m - m // p, generator=generator, dtype=torch.float64)
    bias_t = torch.randn(n, generator=generator, dtype=torch.float64) if bias else None
    return [t.to(DEVICE, dtype) if t is not None else None for t in (x, weight, pointwise, bias_t)]


def _run(backend, leaves, grad_out, channels_last, **kw):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in leaves]
    x = leaves[0].to(memory_format=torch.channels_last) if channels_last else leaves[0]
    y = het_conv2d(x, leaves[1], leaves[2], leaves[3], backend=backend, **kw)
    inputs = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, inputs, grad_out.to(y.dtype))
    return [y.detach(), *grads]


@pytest.fixture(params=[False, True], ids=["first-variants", "second-variants"])
def forward_variant(request, monkeypatch):
    """Run the kernels' variants: forward FLAT=False/True and weight gradient
    ALIGNED=False/True together (on a GPU the autotuner otherwise picks; under the
    interpreter the first runs). Yields the forward's FLAT."""
    from leanconv.kernels import conv_common
    from leanconv.kernels.hetconv import hetconv_dw_kernel, hetconv_fwd_kernel

    monkeypatch.setitem(conv_common.FORCED_VARIANT, "FLAT", request.param)
    monkeypatch.setitem(conv_common.FORCED_VARIANT, "ALIGNED", request.param)
    for kernel in (hetconv_fwd_kernel, hetconv_dw_kernel):  # the autotuner remembers a configuration per shape
        kernel.cache.clear()
    yield request.param
    for kernel in (hetconv_fwd_kernel, hetconv_dw_kernel):
        kernel.cache.clear()


@pytest.mark.parametrize("b,m,n,h,w,k,p,layout,stride,padding,dilation,bias,channels_last", CONFIGS)
def test_float32_output_and_gradients_match_reference(b, m, n, h, w, k, p, layout, stride, padding, dilation, bias,
                                                      channels_last, forward_variant):
    leaves = _leaves(b, m, n, h, w, k, p, bias, torch.float32, seed=b * 100 + m + k)
    kw = dict(stride=stride, padding=padding, dilation=dilation, p=p, layout=layout)
    y_ref = het_conv2d(*leaves, backend="reference", **kw)
    grad_out = torch.randn(y_ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    reference = _run("reference", leaves, grad_out, False, **kw)
    fast = _run("triton", leaves, grad_out, channels_last, **kw)
    if channels_last:
        assert fast[0].is_contiguous(memory_format=torch.channels_last)
    names = ["output", "grad input", "grad weight", "grad pointwise_weight", "grad bias"]
    for name, f, r in zip(names, fast, reference):
        assert_matches_reference(f, r, rtol=FLOAT32_TOL, atol=FLOAT32_TOL, what=name)
    from leanconv.kernels.hetconv import hetconv_dw_kernel, hetconv_fwd_kernel

    assert hetconv_fwd_kernel.best_config.kwargs["FLAT"] is forward_variant
    assert hetconv_dw_kernel.best_config.kwargs["ALIGNED"] is forward_variant


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_follows_the_policy(dtype, forward_variant):
    b, m, n, h, w, k, p, layout = 2, 8, 8, 5, 5, 3, 4, "shifted"
    kw = dict(stride=1, padding=1, dilation=1, p=p, layout=layout)
    leaves64 = _leaves(b, m, n, h, w, k, p, True, torch.float64, seed=3)
    grad_out = torch.randn(b, n, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    ref64 = _run("reference", leaves64, grad_out, False, **kw)
    leaves = [t.to(dtype) for t in leaves64]
    torch_lowp = _run("reference", leaves, grad_out, False, **kw)
    fast = _run("triton", leaves, grad_out, True, **kw)
    names = ["output", "grad input", "grad weight", "grad pointwise_weight", "grad bias"]
    for name, f, t, r in zip(names, fast, torch_lowp, ref64):
        assert f.dtype == dtype, name
        assert_lowp_policy(f, t, r, what=name)


def test_every_output_element_is_written():
    # torch.empty outputs: poison the allocator's memory with NaN first, then check for non-finite values
    kw = dict(stride=1, padding=1, dilation=1, p=2, layout="blocked")
    leaves = _leaves(1, 4, 4, 3, 3, 3, 2, True, torch.float32, seed=11)
    for _ in range(3):
        torch.full((4096,), float("nan"), device=DEVICE)
    y = het_conv2d(*leaves, backend="triton", **kw)
    assert torch.isfinite(y).all()


def test_empty_batch():
    leaves = _leaves(1, 4, 4, 3, 3, 3, 2, True, torch.float32, seed=1)
    x = leaves[0][:0].requires_grad_()
    weight = leaves[1].requires_grad_()
    y = het_conv2d(x, weight, leaves[2], leaves[3], padding=1, p=2, backend="triton")
    assert y.shape == (0, 4, 3, 3)
    y.sum().backward()
    assert weight.grad is not None and not weight.grad.any()


def test_backend_is_listed_and_checks_its_input():
    assert "triton" in backend_names() and get_backend("triton").dtypes == (torch.float32, torch.bfloat16, torch.float16)
    x, weight, pointwise = torch.zeros(1, 4, 3, 3, dtype=torch.float64), torch.zeros(4, 2, 3, 3), torch.zeros(4, 2)
    with pytest.raises(ValueError, match="backend 'triton' cannot run this call: .*float64"):
        het_conv2d(x, weight.double(), pointwise.double(), p=2, backend="triton")


def test_unsupported_outside_cuda_without_the_interpreter(monkeypatch):
    from leanconv.ops.hetconv_triton import unsupported

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA" in unsupported(torch.zeros(1, 4, 3, 3))


def test_hetconv2d_layer_with_triton_backend():
    from leanconv import HetConv2d

    torch.manual_seed(0)
    layer = HetConv2d(8, 8, 3, padding=1, p=4, backend="triton").to(DEVICE)
    x = torch.randn(1, 8, 4, 4, device=DEVICE)
    y = layer(x)
    with torch.no_grad():
        expected = het_conv2d(x, layer.weight, layer.pointwise_weight, layer.bias, padding=1, p=4, backend="reference")
    tol = 1e-5 if DEVICE == "cpu" else 5e-3
    assert_matches_reference(y.detach(), expected, rtol=tol, atol=tol)


def test_auto_rule_follows_the_committed_measurements():
    from leanconv.ops.conv_geometry import HetConvGeometry
    from leanconv.ops.backends import hetconv_rule, triton_measured_win
    from leanconv.ops.registry import Plan

    def plan(dtype):
        return Plan("auto", False, True, dtype, True)

    geometry = HetConvGeometry(128, 128, (3, 3), (1, 1), (1, 1), (1, 1), 4, "blocked")
    small = torch.zeros(1, 128, 14, 14, device=DEVICE)
    assert triton_measured_win(small, geometry, plan(torch.bfloat16))
    assert not triton_measured_win(small, geometry, plan(torch.float32))  # TF32: split won
    assert not triton_measured_win(torch.zeros(1, 128, 56, 56, device=DEVICE), geometry, plan(torch.bfloat16))
    wide = geometry._replace(in_channels=512, out_channels=512)
    assert not triton_measured_win(torch.zeros(1, 512, 14, 14, device=DEVICE), wide, plan(torch.bfloat16))
    if DEVICE == "cpu":  # the rule never picks triton off CUDA, interpreter or not
        assert hetconv_rule(small, geometry, plan(torch.bfloat16), False) != "triton"


@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
def test_opt_in_measuring_times_triton_where_it_can_run(monkeypatch, tmp_path, train):
    """Measuring (opt-in) times every registered backend that can run the call on a
    device it is measured on (triton: CUDA; listed for the CPU interpreter here);
    the choice is kept in the cache file and whatever wins computes HetConv."""
    from leanconv import HetConv2d
    from leanconv.ops import measure

    import dataclasses

    from leanconv.ops import registry

    triton = registry.backends("hetconv")["triton"]  # measured on CUDA only; on the interpreter here
    monkeypatch.setitem(registry.backends("hetconv"), "triton", dataclasses.replace(triton, measured=(DEVICE,)))
    cache = tmp_path / "measured.json"
    config.set_benchmark_cache(cache)
    measure.clear_cache()
    torch.manual_seed(0)
    layer = HetConv2d(8, 8, 3, padding=1, p=4).to(DEVICE)
    x = torch.randn(1, 8, 5, 5, device=DEVICE, requires_grad=train).to(memory_format=torch.channels_last)
    with config.benchmarking(), torch.set_grad_enabled(train):
        y = layer(x)
    (key, entry), = json.loads(cache.read_text()).items()
    from leanconv.ops import hetconv_direct

    direct = {"direct"} if DEVICE == "cpu" and hetconv_direct.available() else set()  # the C++ kernel, CPU only
    assert set(entry["median_seconds"]) == {"reference", "split", "triton"} | direct
    assert entry["choice"] == layer.last_backend and key.startswith("hetconv|")
    with torch.no_grad():
        expected = het_conv2d(x, layer.weight, layer.pointwise_weight, layer.bias, padding=1, p=4, backend="reference")
    assert_matches_reference(y.detach(), expected, rtol=1e-5, atol=1e-5)
    measure.clear_cache()


def _prepared(layer):
    (entry,) = layer.__dict__["_dispatcher"].entries.values()
    return entry.prepared


@pytest.mark.parametrize("layout", ["blocked", "shifted"])
def test_layer_inference_packs_weights_once_until_they_change(layout):
    from leanconv import HetConv2d

    torch.manual_seed(0)
    layer = HetConv2d(8, 12, 3, padding=1, p=4, layout=layout, backend="triton").to(DEVICE).eval()
    x = torch.randn(2, 8, 5, 5, device=DEVICE)

    def expected():
        return het_conv2d(x, layer.weight, layer.pointwise_weight, layer.bias, padding=1, p=4, layout=layout,
                          backend="reference")

    with torch.no_grad():
        first = layer(x)
        packed = _prepared(layer)
        second = layer(x)
        assert _prepared(layer) is packed, "reused while the weights are unchanged"
        assert_matches_reference(first, expected(), rtol=FLOAT32_TOL, atol=FLOAT32_TOL)
        assert torch.equal(first, second)
        layer.weight.mul_(-1.0)
        layer.pointwise_weight.add_(0.5)
        changed = layer(x)
        assert _prepared(layer) is not packed, "rebuilt after an in-place update"
        assert_matches_reference(changed, expected(), rtol=FLOAT32_TOL, atol=FLOAT32_TOL, what="output after the update")


def test_autocast_and_torch_compile():
    """AMP: float32 parameters, bfloat16 compute, float32 gradients. torch.compile: the
    same values and gradients as eager (under the interpreter the kernels run outside
    the graph; on a GPU TorchDynamo captures them)."""
    from leanconv import HetConv2d

    torch.manual_seed(0)
    layer = HetConv2d(8, 8, 3, padding=1, p=4, backend="triton").to(DEVICE)
    x = torch.randn(2, 8, 5, 5, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = layer(x)
        expected = het_conv2d(x, layer.weight, layer.pointwise_weight, layer.bias, padding=1, p=4, backend="reference")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and layer.pointwise_weight.grad.dtype == torch.float32
    rel = ((y.float() - expected.float()).norm() / expected.float().norm()).item()
    assert rel < 2e-2

    layer.zero_grad()
    model = torch.nn.Sequential(layer, torch.nn.ReLU())
    compiled = torch.compile(model, backend="aot_eager")
    x.requires_grad_()
    eager = model(x)
    (grad_eager,) = torch.autograd.grad(eager.sum(), x)
    out = compiled(x)
    (grad_compiled,) = torch.autograd.grad(out.sum(), x)
    assert_matches_reference(out, eager, rtol=1e-5, atol=1e-5)
    assert_matches_reference(grad_compiled, grad_eager, rtol=1e-5, atol=1e-5, what="input gradient")


@pytest.mark.skipif(DEVICE != "cpu", reason="the smoke mode runs on the CPU interpreter")
def test_gpu_benchmark_script_runs_in_smoke_mode(tmp_path):
    """benchmarks/gpu_hetconv.py end to end on a tiny shape (its GPU timings are taken on a GPU)."""
    result = run_gpu_benchmark_smoke("gpu_hetconv.py", tmp_path, "--dtypes", "bfloat16")
    assert result["correct"] is True
    (row,) = result["rows"]
    assert row["gate"] and row["triton_fwdbwd_ms"] > 0 and "FLAT" in row["triton_fwd_config"]


def test_geometry_and_argument_errors_name_the_problem():
    leaves = _leaves(1, 4, 4, 3, 3, 3, 2, True, torch.float32, seed=4)
    with pytest.raises(ValueError, match=r"smaller than the dilated kernel \(5 x 5\)"):
        het_conv2d(*leaves, padding=0, dilation=2, p=2, backend="triton")
    with pytest.raises(TypeError, match="weight is torch.float64"):
        het_conv2d(leaves[0], leaves[1].double(), leaves[2], leaves[3], padding=1, p=2, backend="triton")
    from leanconv.ops.hetconv_triton import hetconv_triton

    x, weight, pointwise, bias = leaves
    geometry = ((1, 1), (1, 1), (1, 1), 2, "blocked")
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        hetconv_triton(x, weight, pointwise, bias[:3], *geometry)
    with pytest.raises(ValueError, match=r"pointwise_weight must be \(N, M - M/P\)"):
        hetconv_triton(x, weight, pointwise[:, :1], bias, *geometry)
    with pytest.raises(ValueError, match="weight must be"):
        hetconv_triton(x, weight[:3], pointwise, bias, *geometry)


@pytest.mark.skipif(DEVICE == "cpu", reason="TF32 exists on CUDA only (the interpreter computes IEEE dots)")
def test_float32_follows_the_tf32_flag(monkeypatch):
    """With torch.backends.cudnn.allow_tf32 off, the kernel's float32 dots are IEEE, like F.conv2d's."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    leaves = _leaves(2, 16, 16, 7, 7, 3, 4, True, torch.float32, seed=3)
    kw = dict(padding=1, p=4)
    expected = het_conv2d(*leaves, backend="reference", **kw)
    assert_matches_reference(het_conv2d(*leaves, backend="triton", **kw), expected, rtol=1e-5, atol=1e-5)


def test_non_contiguous_bias_and_double_backward():
    leaves = _leaves(2, 8, 8, 4, 4, 3, 4, False, torch.float32, seed=6)
    bias = torch.randn(16, device=DEVICE)[::2]
    assert not bias.is_contiguous()
    kw = dict(padding=1, p=4)
    expected = het_conv2d(leaves[0], leaves[1], leaves[2], bias, backend="reference", **kw)
    assert_matches_reference(het_conv2d(leaves[0], leaves[1], leaves[2], bias, backend="triton", **kw), expected,
                             rtol=FLOAT32_TOL, atol=FLOAT32_TOL)
    x = leaves[0].clone().requires_grad_()
    y = het_conv2d(x, leaves[1], leaves[2], None, backend="triton", **kw)
    (grad,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_no_plan_is_remembered_while_a_cuda_graph_is_captured(monkeypatch):
    """Under capture auto must not measure; what it runs then is not kept for later calls."""
    from leanconv import HetConv2d

    layer = HetConv2d(8, 8, 3, padding=1, p=4).to(DEVICE)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    x = torch.randn(1, 8, 5, 5, device=DEVICE)
    if DEVICE == "cpu":  # only CUDA captures graphs; on the CPU the plan is kept
        layer(x)
        assert len(layer.__dict__["_dispatcher"].entries) == 1
        return
    with config.benchmarking():
        layer(x)
    assert not layer.__dict__["_dispatcher"].entries
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    layer(x)
    assert len(layer.__dict__["_dispatcher"].entries) == 1
