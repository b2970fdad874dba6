"""PyTorch's own transforms called directly on every leanconv layer kind, with no
leanconv preparation step: torch.jit.trace, both ONNX exporters, torch.export,
torch.compile(fullgraph=True) forward and backward, autocast with every backend,
inference_mode followed by training, and torch.jit.script's one clear error.

Each result is compared with the eager layer (and, for ONNX, run by onnxruntime).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import leanconv
from leanconv.layers import DepthwiseConv2d

from helpers import assert_lowp_policy, assert_matches_reference

# name -> (builder, input channels); shapes small, arguments awkward on purpose
LAYERS = {
    "hetconv-blocked": (lambda: leanconv.HetConv2d(8, 12, 3, padding=1, p=4), 8),
    "hetconv-shifted": (lambda: leanconv.HetConv2d(8, 8, 3, padding=1, p=2, layout="shifted"), 8),
    "hetconv-stride2-nobias": (lambda: leanconv.HetConv2d(8, 8, 3, stride=2, padding=1, bias=False, p=4), 8),
    "hetconv-dilation2-shifted": (
        lambda: leanconv.HetConv2d(12, 6, (3, 5), padding=(2, 4), dilation=2, p=3, layout="shifted"), 12),
    "hetconv-reflect-p1": (lambda: leanconv.HetConv2d(4, 6, 3, padding=1, padding_mode="reflect", p=1), 4),
    "dsc": (lambda: leanconv.DSConv2d(8, 12, 3, stride=2, padding=1, with_bn=True), 8),
    "gwpw": (lambda: leanconv.GWPWConv2d(8, 12, 3, padding=1, groups=4), 8),
    "bsconv_u": (lambda: leanconv.BSConvU2d(8, 12, 3, padding=1, with_bn=True), 8),
    "bsconv_s": (lambda: leanconv.BSConvS2d(8, 12, 3, padding=1, with_bn=True), 8),
    "depthwise": (lambda: DepthwiseConv2d(8, 16, 3, padding=2, dilation=2, bias=False), 8),
}


def _layer(name: str):
    torch.manual_seed(0)
    build, channels = LAYERS[name]
    layer = build().eval()
    for module in layer.modules():  # BN statistics that are not the identity
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return layer, torch.randn(2, channels, 9, 7)


names = pytest.mark.parametrize("name", list(LAYERS))


def _train_with_frozen_bn(layer: nn.Module) -> nn.Module:
    """Training mode for the convolutions, BN on its running statistics (so that two
    forwards compute the same function and leave nothing changed between them)."""
    layer.train()
    for module in layer.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    return layer


@names
def test_jit_trace(name):
    layer, x = _layer(name)
    with torch.no_grad():
        traced = torch.jit.trace(layer, (x,))
        assert_matches_reference(traced(x), layer(x))
        other = torch.randn(3, *x.shape[1:])  # another batch size through the traced graph
        assert_matches_reference(traced(other), layer(other))


@names
def test_torch_export(name):
    layer, x = _layer(name)
    program = torch.export.export(layer, (x,))
    with torch.no_grad():
        assert_matches_reference(program.module()(x), layer(x))


@names
@pytest.mark.slow
def test_compile_fullgraph_forward_and_backward(name):
    layer, x = _layer(name)
    _train_with_frozen_bn(layer)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_eager, out_compiled = layer(x1), compiled(x2)
    assert_matches_reference(out_compiled, out_eager)
    grad = torch.randn_like(out_eager)
    params = [p for p in layer.parameters() if p.numel()]  # p=1 HetConv has an empty pointwise_weight
    eager_grads = torch.autograd.grad(out_eager, [x1, *params], grad)
    compiled_grads = torch.autograd.grad(out_compiled, [x2, *params], grad)
    for g_compiled, g_eager in zip(compiled_grads, eager_grads):
        assert_matches_reference(g_compiled, g_eager, what="gradient")


def test_jit_script_raises_one_clear_error():
    for name in ("hetconv-blocked", "dsc", "depthwise"):
        layer, _ = _layer(name)
        with pytest.raises(RuntimeError, match=r"torch\.jit\.trace.*torch\.export"):
            torch.jit.script(nn.Sequential(layer, nn.ReLU()))


# ------------------------------------------- each transform as a fresh process's first call
# Every kind in one model, so that the transform is the first call of every kind after
# ``import leanconv`` (what runs once per process, e.g. reading the environment, runs inside it).
FIRST_CALL = """
import sys, warnings
import torch, torch.nn as nn
import leanconv
from leanconv.layers import DepthwiseConv2d

torch.manual_seed(0)
model = nn.Sequential(
    leanconv.HetConv2d(8, 8, 3, padding=1, p=4), nn.ReLU(),
    leanconv.HetConv2d(8, 8, 3, padding=1, p=2, layout="shifted"),
    leanconv.DSConv2d(8, 8, 3, padding=1, with_bn=True), leanconv.GWPWConv2d(8, 8, 3, padding=1, groups=4),
    leanconv.BSConvU2d(8, 8, 3, padding=1, with_bn=True), leanconv.BSConvS2d(8, 8, 3, padding=1, with_bn=True),
    DepthwiseConv2d(8, 8, 3, padding=1),
)
transform, x = sys.argv[1], torch.randn(2, 8, 9, 7)
if transform == "compile-train":
    model.train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    xc = x.clone().requires_grad_()
    out = compiled(xc)
    out.sum().backward()
    model.zero_grad()
    xe = x.clone().requires_grad_()
    model(xe).sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-5)
else:
    model.eval()
    with torch.no_grad():
        if transform == "compile-eval":
            out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        elif transform == "export":
            out = torch.export.export(model, (x,)).module()(x)
        elif transform == "trace":
            out = torch.jit.trace(model, (x,))(x)
with torch.no_grad():
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)
print("ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize("transform", ["compile-eval", "compile-train", "export", "trace"])
def test_transform_as_the_first_call_of_a_fresh_process(transform):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", FIRST_CALL, transform], capture_output=True, text=True,
                            timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# ---------------------------------------------------------------------- ONNX
try:
    import onnx
    import onnxruntime as ort
except ImportError:  # each ONNX test is skipped, the rest of the file runs
    onnx = ort = None
requires_onnx = pytest.mark.skipif(onnx is None, reason="the onnx extra is not installed (pip install 'leanconv[onnx]')")


def _onnx_run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@requires_onnx
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
@names
def test_onnx_export_without_preparation(name, dynamo, tmp_path):
    layer, x = _layer(name)
    path = tmp_path / "layer.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(layer, (x,), str(path), dynamo=dynamo, opset_version=18)
    with torch.no_grad():
        assert_matches_reference(_onnx_run(path, x), layer(x), atol=1e-5, rtol=1e-5)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert "ScatterND" not in ops and "ScatterElements" not in ops, ops
    if name.startswith("hetconv") and not name.endswith("p1"):
        convs = ops.count("Conv")
        assert convs == 2 and ops.count("Add") == 1, f"HetConv as Conv + Conv + Add, got {ops}"
        gathers = ops.count("Gather")
        assert gathers == (2 if "shifted" in name else 0), ops  # channels into group order and back
        assert set(ops) <= {"Conv", "Add", "Gather", "Constant", "Slice", "Pad"}, ops


# ------------------------------------------------------------------ autocast
def _computes_bfloat16(name: str) -> bool:
    dtypes = leanconv.ops.get_backend(name).dtypes
    return dtypes is None or torch.bfloat16 in dtypes


# every CPU backend that computes in bfloat16 ('direct' is float32 only: auto leaves it under autocast)
HETCONV_BACKENDS = [b for b in leanconv.backend_names() if b not in ("auto", "triton") and _computes_bfloat16(b)] + ["auto"]


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
@pytest.mark.parametrize("backend", HETCONV_BACKENDS)
@pytest.mark.parametrize("layout", ["blocked", "shifted"])
def test_cpu_autocast_bfloat16_every_backend(backend, layout, train, channels_last):
    """Like nn.Conv2d: bfloat16 output, float32 parameter gradients, error within the policy."""
    torch.manual_seed(0)
    layer = leanconv.HetConv2d(16, 16, 3, padding=1, p=4, layout=layout, backend=backend).train(train)
    dense = layer.to_conv2d()
    x = torch.randn(2, 16, 8, 8)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.set_grad_enabled(train), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        out_dense = dense(x)
    assert out.dtype == out_dense.dtype == torch.bfloat16
    ref64 = nn.functional.conv2d(x.double(), dense.weight.double(), dense.bias.double(), padding=1)
    assert_lowp_policy(out, out_dense, ref64)
    if train:
        out.float().sum().backward()
        out_dense.float().sum().backward()
        assert layer.weight.grad.dtype == torch.float32 and layer.pointwise_weight.grad.dtype == torch.float32
        dense_grad = leanconv.ops.extract_hetconv_weights(dense.weight.grad.double(), 4, layout, check_structure=False)
        rel = (layer.weight.grad.double() - dense_grad[0]).norm() / dense_grad[0].norm()
        assert rel < 2e-2, f"weight gradient off by {rel:.3g} relative"


def test_cpu_autocast_float32_only_backend_is_named_in_the_error():
    if "direct" not in leanconv.backend_names():
        pytest.skip("no direct backend here")
    layer = leanconv.HetConv2d(16, 16, 3, padding=1, p=4, backend="direct")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="direct.*float32.*bfloat16"):
        layer(torch.randn(2, 16, 8, 8).to(memory_format=torch.channels_last))


@pytest.mark.parametrize("name", ["dsc", "bsconv_u", "bsconv_s", "gwpw", "depthwise"])
def test_cpu_autocast_separable_kinds_return_bfloat16(name):
    layer, x = _layer(name)
    layer.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters() if p.numel())


# ---------------------------------------------- inference_mode, then training
@pytest.mark.parametrize("name", list(LAYERS))
def test_inference_mode_then_training(name, recwarn):
    layer, x = _layer(name)
    with torch.inference_mode():
        first = layer(x)
    _train_with_frozen_bn(layer)
    x = x.clone().requires_grad_()
    out = layer(x)
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in layer.parameters() if p.numel())
    layer.eval()
    with torch.no_grad():
        assert_matches_reference(layer(x.detach()), first)
    assert not [w for w in recwarn if "leanconv" in str(w.message)], [str(w.message) for w in recwarn]


def test_a_compiled_model_is_not_recompiled_on_its_second_call():
    """Nothing leanconv reads in a forward changes between calls (e.g. a thread-local
    created on first read), so one compilation serves every call of the same setting."""
    from torch._dynamo.utils import counters

    layer, x = _layer("hetconv-blocked")
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, backend="eager")
    with torch.no_grad():
        for _ in range(3):
            compiled(x)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
