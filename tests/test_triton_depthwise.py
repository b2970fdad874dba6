"""The ``triton`` depthwise backend and DepthwiseConv2d against ``F.conv2d``.

As in test_triton_hetconv.py: without a GPU the kernels run on CPU tensors under
``TRITON_INTERPRET=1`` (set by conftest.py), on tiny shapes. float32 is held to
the reference-path tolerance (the kernels accumulate in float32 without dots, so
the interpreter computes what the GPU computes), bfloat16 and float16 to the
low-precision policy against a float64 reference (tests/helpers.py).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import assert_lowp_policy, assert_matches_reference, run_gpu_benchmark_smoke

HAS_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = [  # the Triton interpreter: slow on the CPU
    pytest.mark.slow,
    pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (pip install 'leanconv[triton]')"),
]

import leanconv  # noqa: E402
from leanconv.layers import DepthwiseConv2d  # noqa: E402
from leanconv import config  # noqa: E402
from leanconv.functional import depthwise_conv2d as functional_depthwise  # noqa: E402
from leanconv.ops import measure  # noqa: E402


def depthwise_conv2d(x, weight, bias, stride, padding, dilation, backend):
    return functional_depthwise(x, weight, bias, stride, padding, dilation, backend=backend)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ["output", "grad input", "grad weight", "grad bias"]

# B, C, D (multiplier), H, W, (KH, KW), stride, padding, dilation, bias, memory
CONFIGS = [
    pytest.param(2, 8, 1, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1), True, "nhwc", id="k3-nhwc"),
    pytest.param(2, 5, 2, 7, 6, (3, 5), (2, 1), (1, 2), (1, 1), True, "nchw", id="d2-k3x5-s2x1"),
    pytest.param(1, 20, 1, 9, 9, (3, 3), (2, 2), (1, 1), (2, 1), False, "nhwc", id="c20-s2-dil2x1"),
    pytest.param(2, 3, 3, 6, 6, (5, 5), (3, 2), (2, 0), (1, 1), True, "nhwc", id="d3-k5-s3x2"),
    pytest.param(1, 4, 1, 4, 4, (1, 1), (2, 2), (0, 0), (1, 1), True, "nchw", id="k1-s2"),
    pytest.param(2, 6, 1, 6, 7, (2, 4), (1, 2), (1, 2), (1, 1), True, "nhwc", id="even-k2x4"),
    pytest.param(1, 4, 1, 2, 3, (3, 3), (3, 3), (2, 2), (1, 1), True, "nhwc", id="map-under-stride-pad2"),
    pytest.param(2, 6, 1, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), True, "strided", id="non-contiguous"),
]


def _leaves(b, c, d, h, w, kernel, bias, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=generator, dtype=torch.float64)
    weight = torch.randn(c * d, 1, *kernel, generator=generator, dtype=torch.float64)
    bias_t = torch.randn(c * d, generator=generator, dtype=torch.float64) if bias else None
    return [t.to(DEVICE) if t is not None else None for t in (x, weight, bias_t)]


def _run(backend, leaves, grad_out, memory, dtype, stride, padding, dilation):
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in leaves]
    x = leaves[0]
    if memory == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    elif memory == "strided":  # the even columns of a twice as wide tensor: column stride 2
        x = torch.stack([x, torch.zeros_like(x)], dim=-1).flatten(-2)[..., ::2]
        assert not x.is_contiguous() and x.stride(-1) == 2
    y = depthwise_conv2d(x, leaves[1], leaves[2], stride, padding, dilation, backend)
    inputs = [t for t in leaves if t is not None]
    return [y.detach(), *torch.autograd.grad(y, inputs, grad_out.to(y.dtype))]


@pytest.mark.parametrize("b,c,d,h,w,kernel,stride,padding,dilation,bias,memory", CONFIGS)
def test_float32_output_and_gradients_match_torch(b, c, d, h, w, kernel, stride, padding, dilation, bias, memory):
    leaves = _leaves(b, c, d, h, w, kernel, bias, seed=b * 100 + c + d)
    geometry = (stride, padding, dilation)
    y64 = depthwise_conv2d(leaves[0], leaves[1], leaves[2], *geometry, "torch")
    grad_out = torch.randn(y64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    reference = _run("torch", leaves, grad_out, "nchw", torch.float64, *geometry)
    fast = _run("triton", leaves, grad_out, memory, torch.float32, *geometry)
    if memory == "nhwc":
        assert fast[0].is_contiguous(memory_format=torch.channels_last)
    tol = 1e-5 if DEVICE == "cpu" else 5e-3
    for name, f, r in zip(NAMES, fast, reference):
        assert f.dtype == torch.float32, name
        assert_matches_reference(f.double(), r, rtol=tol, atol=tol, what=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_follows_the_policy(dtype):
    geometry = ((2, 1), (1, 1), (1, 1))
    leaves = _leaves(2, 6, 2, 6, 5, (3, 3), True, seed=3)
    y64 = depthwise_conv2d(leaves[0], leaves[1], leaves[2], *geometry, "torch")
    grad_out = torch.randn(y64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    ref64 = _run("torch", leaves, grad_out, "nchw", torch.float64, *geometry)
    torch_lowp = _run("torch", leaves, grad_out, "nhwc", dtype, *geometry)
    fast = _run("triton", leaves, grad_out, "nhwc", dtype, *geometry)
    for name, f, t, r in zip(NAMES, fast, torch_lowp, ref64):
        assert f.dtype == dtype, name
        assert_lowp_policy(f, t, r, what=name)


def test_every_output_element_is_written_and_empty_batch():
    for _ in range(3):  # torch.empty outputs: poison the allocator's memory with NaN first
        torch.full((4096,), float("nan"), device=DEVICE)
    x, weight, bias = (t.float() for t in _leaves(1, 4, 1, 3, 3, (3, 3), True, seed=1))
    assert torch.isfinite(depthwise_conv2d(x, weight, bias, (1, 1), (1, 1), (1, 1), "triton")).all()
    empty = x[:0].requires_grad_()
    weight.requires_grad_()
    y = depthwise_conv2d(empty, weight, bias, (1, 1), (1, 1), (1, 1), "triton")
    assert y.shape == (0, 4, 3, 3)
    y.sum().backward()
    assert weight.grad is not None and not weight.grad.any()


def test_triton_refuses_what_it_cannot_run(monkeypatch):
    with pytest.raises(ValueError, match="float64"):
        depthwise_conv2d(torch.zeros(1, 2, 3, 3, dtype=torch.float64, device=DEVICE),
                         torch.zeros(2, 1, 3, 3, dtype=torch.float64, device=DEVICE), None,
                         (1, 1), (1, 1), (1, 1), "triton")
    with pytest.raises(ValueError, match=r"must be a multiple of the input's 4 channels"):
        depthwise_conv2d(torch.zeros(1, 4, 3, 3, device=DEVICE), torch.zeros(6, 1, 3, 3, device=DEVICE), None,
                         (1, 1), (1, 1), (1, 1), "triton")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="CUDA"):
            depthwise_conv2d(torch.zeros(1, 2, 3, 3), torch.zeros(2, 1, 3, 3), None, (1, 1), (1, 1), (1, 1), "triton")


# --------------------------------------------------------------------------- the layer
def _pair(layer_kwargs, backend, x):
    torch.manual_seed(0)
    reference = DepthwiseConv2d(**layer_kwargs, backend="torch").to(DEVICE)
    fast = DepthwiseConv2d(**layer_kwargs, backend=backend).to(DEVICE)
    fast.load_state_dict(reference.state_dict())
    return reference(x), fast(x), fast


@pytest.mark.parametrize("kwargs", [
    dict(in_channels=4, out_channels=8, kernel_size=3, padding="same"),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect", bias=False),
    dict(in_channels=4, out_channels=4, kernel_size=(3, 1), stride=2, padding="valid"),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=2, dilation=2, padding_mode="circular"),
], ids=["same-d2", "reflect", "valid-s2", "circular-dil2"])
def test_layer_with_triton_backend_matches_torch(kwargs):
    x = torch.randn(2, 4, 6, 5, device=DEVICE)
    expected, got, layer = _pair(kwargs, "triton", x)
    assert layer.last_backend == "triton"
    assert_matches_reference(got, expected, rtol=1e-5, atol=1e-5)
    unbatched = layer(x[0])
    assert unbatched.shape == expected.shape[1:]
    assert_matches_reference(unbatched, expected[0], rtol=1e-5, atol=1e-5, what="unbatched output")


def test_layer_is_an_nn_conv2d_with_its_state_dict_and_arguments_checked():
    layer = DepthwiseConv2d(6, 12, 3, padding=1)
    assert isinstance(layer, nn.Conv2d) and layer.groups == 6
    assert set(layer.state_dict()) == set(nn.Conv2d(6, 12, 3, padding=1, groups=6).state_dict())
    with pytest.raises(ValueError, match="out_channels must be a multiple of in_channels"):
        DepthwiseConv2d(6, 8, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        DepthwiseConv2d(6, 6, 3, backend="cudnn")
    with pytest.raises(ValueError, match="backend must be one of"):
        layer.backend = "fast"
    layer.backend = "triton"
    assert "backend='triton'" in repr(layer)


def test_wrong_channel_count_is_refused_on_every_path(monkeypatch):
    layer = DepthwiseConv2d(16, 32, 3, padding=1, backend="triton").to(DEVICE)
    with pytest.raises(ValueError, match="expected input with 16 channels"):
        layer(torch.randn(1, 8, 5, 5, device=DEVICE))
    layer.backend = "auto"
    with pytest.raises(ValueError, match="expected input with 16 channels"):
        layer(torch.randn(1, 8, 5, 5, device=DEVICE))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_uneven_same_padding_needs_torch():
    layer = DepthwiseConv2d(2, 2, 2, padding="same", backend="triton").to(DEVICE)
    with pytest.raises(ValueError, match="symmetric padding"):
        layer(torch.randn(1, 2, 4, 4, device=DEVICE))
    layer.backend = "auto"
    assert layer(torch.randn(1, 2, 4, 4, device=DEVICE)).shape == (1, 2, 4, 4)
    assert layer.last_backend == "torch"


def test_environment_variable_selects_the_backend(leanconv_env):
    layer = DepthwiseConv2d(3, 3, 3, padding=1).to(DEVICE)
    x = torch.randn(1, 3, 4, 4, device=DEVICE)
    leanconv_env(config.DEPTHWISE_BACKEND_ENV, "triton")
    layer(x)
    assert layer.last_backend == "triton"
    leanconv_env(config.DEPTHWISE_BACKEND_ENV, "nonsense")
    with pytest.raises(ValueError, match="LEANCONV_DEPTHWISE_BACKEND"):
        layer(x)


@pytest.mark.parametrize("kind", ["dsc", "bsconv_u", "bsconv_s"])
def test_separable_layers_train_through_the_triton_depthwise(kind):
    torch.manual_seed(0)
    options = dict(with_bn=True) if kind != "dsc" else dict(depth_multiplier=2)
    reference = leanconv.make_conv(kind, 8, 12, 3, stride=2, padding=1, **options).to(DEVICE)
    fast = leanconv.make_conv(kind, 8, 12, 3, stride=2, padding=1, depthwise_backend="triton", **options).to(DEVICE)
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(2, 8, 7, 7, device=DEVICE)
    out_ref, out_fast = reference(x), fast(x)
    assert fast.dw.last_backend == "triton"
    assert_matches_reference(out_fast, out_ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out_ref)
    grads_ref = torch.autograd.grad(out_ref, list(reference.parameters()), grad)
    grads_fast = torch.autograd.grad(out_fast, list(fast.parameters()), grad)
    for (name, _), g_ref, g_fast in zip(reference.named_parameters(), grads_ref, grads_fast):
        assert_matches_reference(g_fast, g_ref, rtol=1e-5, atol=1e-5, what=f"grad {name}")


# --------------------------------------------------------------------------- auto
def test_auto_runs_torch_off_cuda():
    layer = DepthwiseConv2d(4, 4, 3, padding=1)
    layer(torch.randn(1, 4, 8, 8))
    assert layer.last_backend == "torch"


@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
def test_opt_in_measuring_times_both_once(monkeypatch, tmp_path, train):
    """With measuring on, both backends (triton runs on the interpreter here) are
    timed once per setting, the winner is remembered (on the layer and in the
    cache file) and computes the same."""
    import dataclasses

    from leanconv.ops import registry

    triton = registry.backends("depthwise")["triton"]  # measured on CUDA only; on the interpreter here
    monkeypatch.setitem(registry.backends("depthwise"), "triton", dataclasses.replace(triton, measured=(DEVICE,)))
    cache = tmp_path / "measured.json"
    config.set_benchmark_cache(cache)
    measure.clear_cache()
    timed = []
    original = measure._time_candidates
    monkeypatch.setattr(measure, "_time_candidates",
                        lambda candidates, rounds: timed.append(sorted(candidates)) or original(candidates, 1))
    layer = DepthwiseConv2d(4, 4, 3, padding=1, bias=True).to(DEVICE)
    x = torch.randn(2, 4, 6, 6, device=DEVICE, requires_grad=train)
    with config.benchmarking(), torch.set_grad_enabled(train):
        first = layer(x)
        second = layer(x)
    assert timed == [["torch", "triton"]], "measured once for the setting"
    assert layer.last_backend in ("torch", "triton")
    assert_matches_reference(second, first, rtol=1e-5, atol=1e-5)
    stored = json.loads(cache.read_text())
    (key, entry), = stored.items()
    assert key.startswith("depthwise|" + DEVICE) and ("train" if train else "infer") in key
    assert set(entry["median_seconds"]) == {"torch", "triton"}
    measure.clear_cache()


def test_auto_does_not_measure_by_default(monkeypatch):
    monkeypatch.setattr(measure, "measured_choice", lambda *a, **k: pytest.fail("measured without being asked"))
    layer = DepthwiseConv2d(4, 4, 3, padding=1).to(DEVICE)
    layer(torch.randn(1, 4, 5, 5, device=DEVICE))
    assert layer.last_backend == "torch"


@pytest.mark.skipif(DEVICE != "cpu", reason="the smoke mode runs on the CPU interpreter")
def test_gpu_benchmark_script_runs_in_smoke_mode(tmp_path):
    """benchmarks/gpu_depthwise.py end to end on tiny shapes (its GPU timings are taken on a GPU)."""
    result = run_gpu_benchmark_smoke("gpu_depthwise.py", tmp_path, "--dtypes", "float32")
    assert result["correct"] is True
    assert [r["layer"] for r in result["rows"]] == ["smoke.tiny", "smoke.tiny_s2"]
    assert all(r["gate"] and r["triton_fwdbwd_ms"] > 0 for r in result["rows"])


def test_autocast_and_torch_compile():
    torch.manual_seed(0)
    layer = DepthwiseConv2d(6, 12, 3, padding=1, backend="triton").to(DEVICE)
    x = torch.randn(2, 6, 5, 5, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = layer(x)
        expected = F.conv2d(x, layer.weight, layer.bias, 1, 1, 1, 6)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and layer.bias.grad.dtype == torch.float32
    assert ((y.float() - expected.float()).norm() / expected.float().norm()).item() < 2e-2

    model = torch.nn.Sequential(layer, torch.nn.ReLU())
    compiled = torch.compile(model, backend="aot_eager")
    x.requires_grad_()
    eager = model(x)
    (grad_eager,) = torch.autograd.grad(eager.sum(), x)
    out = compiled(x)
    (grad_compiled,) = torch.autograd.grad(out.sum(), x)
    assert layer.last_backend == "triton"
    assert_matches_reference(out, eager, rtol=1e-5, atol=1e-5)
    assert_matches_reference(grad_compiled, grad_eager, rtol=1e-5, atol=1e-5, what="input gradient")


def test_geometry_errors_and_non_contiguous_bias():
    x, weight, bias = (t.float() for t in _leaves(1, 4, 1, 3, 3, (3, 3), True, seed=8))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        depthwise_conv2d(x, weight, bias, (1, 1), (0, 0), (2, 2), "triton")
    with pytest.raises(ValueError, match="padding must be >= 0 in each dimension"):
        depthwise_conv2d(x, weight, bias, (1, 1), (-1, 0), (1, 1), "triton")
    with pytest.raises(ValueError, match="stride must be >= 1 in each dimension"):
        depthwise_conv2d(x, weight, bias, (0, 1), (1, 1), (1, 1), "triton")
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        depthwise_conv2d(x, weight, bias[:3], (1, 1), (1, 1), (1, 1), "triton")
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        DepthwiseConv2d(4, 4, 5, backend="triton").to(DEVICE)(x)
    strided_bias = torch.randn(8, device=DEVICE)[::2]
    expected = F.conv2d(x, weight, strided_bias, 1, 1, 1, 4)
    assert_matches_reference(depthwise_conv2d(x, weight, strided_bias, (1, 1), (1, 1), (1, 1), "triton"), expected)


def test_double_backward_is_refused_clearly():
    x, weight, _ = (t.float() if t is not None else None for t in _leaves(1, 4, 1, 4, 4, (3, 3), False, seed=9))
    x.requires_grad_()
    y = depthwise_conv2d(x, weight, None, (1, 1), (1, 1), (1, 1), "triton")
    (grad,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()
