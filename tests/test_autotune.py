"""The fast CPU backends (masked, fused, packed), the measuring ``auto`` and the layer's
cache of weight-derived tensors: everything auto can pick is exact, and cached
tensors never outlive the weights they came from."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import leanconv
from leanconv.functional import het_conv2d
from leanconv.ops import autotune

from helpers import assert_matches_reference

FAST = ["masked", "fused", "packed"]


@pytest.fixture(autouse=True)
def fresh_autotune_cache(monkeypatch):
    monkeypatch.delenv(autotune.CACHE_ENV, raising=False)
    monkeypatch.delenv(autotune.AUTOTUNE_ENV, raising=False)
    monkeypatch.delenv("LEANCONV_BACKEND", raising=False)
    autotune.clear_cache()
    yield
    autotune.clear_cache()


def random_layer(generator, dtype=torch.float32):
    p = int(torch.randint(2, 5, (), generator=generator))
    m = p * int(torch.randint(1, 5, (), generator=generator))
    n = p * int(torch.randint(1, 4, (), generator=generator))
    k = (int(torch.randint(0, 3, (), generator=generator)) * 2 + 1, int(torch.randint(0, 2, (), generator=generator)) * 2 + 1)
    stride = (int(torch.randint(1, 3, (), generator=generator)), int(torch.randint(1, 3, (), generator=generator)))
    dilation = (int(torch.randint(1, 3, (), generator=generator)), 1)
    padding = (int(torch.randint(0, 3, (), generator=generator)), int(torch.randint(0, 2, (), generator=generator)))
    layout = ["blocked", "shifted"][int(torch.randint(0, 2, (), generator=generator))]
    bias = bool(torch.randint(0, 2, (), generator=generator))
    return leanconv.HetConv2d(m, n, k, stride, padding, dilation, bias, p=p, layout=layout, dtype=dtype)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_fast_backends_match_reference_on_random_shapes(backend, channels_last):
    generator = torch.Generator().manual_seed(11)
    for _ in range(12):
        layer = random_layer(generator, dtype=torch.float64)
        x = torch.randn(3, layer.in_channels, 11, 10, dtype=torch.float64, generator=generator)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        params = [x, layer.weight, layer.pointwise_weight] + ([layer.bias] if layer.bias is not None else [])
        reference = F.conv2d(x, layer.dense_weight(), layer.bias, layer.stride, layer.padding, layer.dilation)
        out = het_conv2d(x, layer.weight, layer.pointwise_weight, layer.bias, layer.stride, layer.padding,
                         layer.dilation, p=layer.p, layout=layer.layout, backend=backend)
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert_matches_reference(out, reference, atol=1e-12, rtol=0, what=f"{backend} {layer}")
        grad = torch.randn_like(reference)
        for a, b in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(reference, params, grad)):
            assert_matches_reference(a, b, atol=1e-12, rtol=0, what=f"{backend} gradient {layer}")


@pytest.mark.parametrize("backend", FAST + ["reference"])
def test_layer_inference_with_cached_weights_matches_reference_float32(backend):
    generator = torch.Generator().manual_seed(5)
    for _ in range(8):
        layer = random_layer(generator).eval()
        layer.backend = backend
        x = torch.randn(2, layer.in_channels, 9, 12, generator=generator).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            out = layer(x)
            reference = F.conv2d(x, layer.dense_weight(), layer.bias, layer.stride, layer.padding, layer.dilation)
        assert layer.last_backend == backend
        assert_matches_reference(out, reference, what=f"{backend} {layer}")
        if backend == "masked" and torch.backends.mkldnn.is_available():
            # channels-last float32 inference: the grouped conv adds itself onto the 1x1 result (oneDNN post-op)
            assert "masked_packed" in layer.__dict__["_prepared"]


@pytest.mark.parametrize("backend", ["fused", "masked"])
@pytest.mark.parametrize("stride", [1, 2], ids=["direct", "strided"])
def test_gradcheck_float64(backend, stride):
    layer = leanconv.HetConv2d(4, 4, 3, padding=1, p=2, layout="shifted", dtype=torch.float64)
    x = torch.randn(2, 4, 5, 4, dtype=torch.float64, requires_grad=True).contiguous(memory_format=torch.channels_last)
    inputs = (x, layer.weight, layer.pointwise_weight, layer.bias)
    assert torch.autograd.gradcheck(
        lambda x, w, pw, b: het_conv2d(x, w, pw, b, stride, 1, p=2, layout="shifted", backend=backend), inputs
    )


# ---------------------------------------------------------------- measuring auto

def _force_measuring(monkeypatch):
    monkeypatch.setattr(autotune, "MIN_MEASURED_MACS", 0)
    calls = []
    original = autotune._time_candidates

    def counting(candidates, rounds):
        calls.append(sorted(candidates))
        return original(candidates, 1)

    monkeypatch.setattr(autotune, "_time_candidates", counting)
    return calls


@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
def test_measuring_auto_picks_an_exact_backend_once_per_setting(monkeypatch, train):
    calls = _force_measuring(monkeypatch)
    generator = torch.Generator().manual_seed(2)
    for _ in range(6):
        layer = random_layer(generator)
        x = torch.randn(2, layer.in_channels, 8, 9, generator=generator).requires_grad_(train)
        with torch.set_grad_enabled(train):
            out = layer(x)
            again = layer(x)
        assert layer.last_backend in ("reference", "split", "masked", "fused", "packed")
        reference = F.conv2d(x, layer.dense_weight(), layer.bias, layer.stride, layer.padding, layer.dilation)
        assert_matches_reference(out, reference, what=str(layer))
        assert_matches_reference(again, reference, what=str(layer))
        if train:
            # Measuring ran forward and backward on detached copies: no gradient reached the layer.
            assert all(t.grad is None for t in layer.parameters())
            out.sum().backward()
            assert layer.weight.grad is not None
    assert len(calls) == 6  # one measurement per new setting, none for the repeated call
    assert all("loop" not in names for names in calls)
    assert all(("packed" in names) != train for names in calls)
    # NCHW training never measures fused: its channels-last copies would raise peak memory above the dense layer's.
    assert all(("fused" in names) != train for names in calls)


def test_measuring_is_off_by_environment_dtype_and_size(monkeypatch):
    calls = _force_measuring(monkeypatch)
    layer = leanconv.HetConv2d(8, 8, 3, padding=1, p=4)
    x = torch.randn(1, 8, 6, 6)
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "0")
    layer(x)
    assert calls == [] and layer.last_backend == autotune.heuristic_choice(x, layer.weight, 4)
    monkeypatch.delenv(autotune.AUTOTUNE_ENV)
    layer.double()(x.double())
    assert calls == [], "float64 is never measured"
    monkeypatch.setattr(autotune, "MIN_MEASURED_MACS", 10**12)
    layer.float()(x)
    assert calls == [], "small layers are never measured"


def test_heuristic_is_deterministic_and_exact():
    small = torch.randn(1, 8, 6, 6)
    assert autotune.heuristic_choice(small, torch.empty(8, 2, 3, 3), 4) == "reference"
    big = torch.empty(64, 256, 8, 8)
    assert autotune.heuristic_choice(big, torch.empty(256, 64, 3, 3), 4) == "masked"
    wide = torch.empty(8, 64, 32, 32)
    assert autotune.heuristic_choice(wide, torch.empty(64, 16, 3, 3), 4) == "masked"
    wide = wide.contiguous(memory_format=torch.channels_last)
    assert autotune.heuristic_choice(wide, torch.empty(64, 16, 3, 3), 4) == "masked"
    assert autotune.heuristic_choice(big.double(), torch.empty(256, 64, 3, 3), 4) == "split"
    assert autotune.heuristic_choice(big, torch.empty(256, 256, 3, 3), 1) == "split"
    assert autotune.heuristic_choice(big, torch.empty(256, 128, 1, 3), 2) == "reference"  # 1/2 + 1/3 > 0.8


def test_disk_cache_is_written_atomically_and_reused(monkeypatch, tmp_path):
    calls = _force_measuring(monkeypatch)
    path = tmp_path / "tune" / "cache.json"
    monkeypatch.setenv(autotune.CACHE_ENV, str(path))
    layer = leanconv.HetConv2d(8, 16, 3, padding=1, p=4).eval()
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        layer(x)
    chosen = layer.last_backend
    stored = json.loads(path.read_text())
    assert len(stored) == 1 and next(iter(stored.values()))["choice"] == chosen
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".autotune-")]
    autotune.clear_cache()
    with torch.no_grad():
        layer(x)
    assert len(calls) == 1 and layer.last_backend == chosen


def test_tuning_key_separates_training_format_and_dtype():
    w = torch.empty(16, 2, 3, 3)
    x = torch.empty(2, 8, 7, 7)
    keys = {
        autotune.tuning_key(x, w, 4, "blocked", (1, 1), (1, 1), (1, 1), True, False),
        autotune.tuning_key(x, w, 4, "blocked", (1, 1), (1, 1), (1, 1), True, True),
        autotune.tuning_key(x.contiguous(memory_format=torch.channels_last), w, 4, "blocked", (1, 1), (1, 1), (1, 1), True, False),
        autotune.tuning_key(x.double(), w, 4, "blocked", (1, 1), (1, 1), (1, 1), True, False),
        autotune.tuning_key(x[:1], w, 4, "blocked", (1, 1), (1, 1), (1, 1), True, False),
    }
    assert len(keys) == 5


# ------------------------------------------------------- weight-derived cache

@pytest.mark.parametrize("kind", ["masked", "fused", "packed", "reference"])
def test_prepared_weights_are_built_once_and_rebuilt_when_weights_change(kind):
    torch.manual_seed(0)
    layer = leanconv.HetConv2d(8, 16, 3, padding=1, p=4, backend=kind)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)

    def check():
        with torch.no_grad():
            out = layer(x)
            reference = F.conv2d(x.to(layer.weight.dtype), layer.dense_weight(), layer.bias, padding=1)
        assert_matches_reference(out, reference, what=kind)

    with torch.no_grad():
        layer(x)
    first = layer.prepared_weights(kind, x, (1, 1))
    assert layer.prepared_weights(kind, x, (1, 1)) is first, "rebuilt without a weight change"
    check()

    # An optimizer step changes the weights in place.
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).square().sum().backward()
    optimizer.step()
    assert layer.prepared_weights(kind, x, (1, 1)) is not first
    check()

    # load_state_dict copies into the same storage.
    before = layer.prepared_weights(kind, x, (1, 1))
    layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()})
    assert layer.prepared_weights(kind, x, (1, 1)) is not before
    check()

    # .to() a dtype: new tensors.
    layer.double()
    x = x.double()
    check()
    layer.float()
    x = x.float()
    check()


def test_training_forward_never_uses_the_cache():
    layer = leanconv.HetConv2d(8, 16, 3, padding=1, p=4, backend="fused")
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        layer(x)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.pointwise_weight.grad is not None
    assert layer.pointwise_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("layout", ["blocked", "shifted"])
def test_fast_pointwise_matrix_equals_the_indexed_one(layout):
    from leanconv.ops.hetconv_fused import pointwise_matrix
    from leanconv.ops.hetconv_layout import materialize_pointwise_matrix

    for m, n, p in [(8, 8, 2), (12, 8, 4), (6, 9, 3), (16, 32, 16), (4, 4, 4)]:
        pw = torch.randn(n, m - m // p, requires_grad=True)
        fast, slow = pointwise_matrix(pw, m, p, layout), materialize_pointwise_matrix(pw, m, p, layout)
        assert torch.equal(fast, slow)
        grad = torch.randn_like(slow)
        assert torch.equal(torch.autograd.grad(fast, pw, grad)[0], torch.autograd.grad(slow, pw, grad)[0])


def test_tracing_takes_the_plain_decomposition(monkeypatch):
    calls = _force_measuring(monkeypatch)
    monkeypatch.setattr(autotune, "autotune_tracing", lambda: True)
    monkeypatch.setattr(leanconv.layers.hetconv, "autotune_tracing", lambda: True)
    layer = leanconv.HetConv2d(64, 64, 3, padding=1, p=4).eval()
    x = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        out = layer(x)
        assert_matches_reference(out, F.conv2d(x, layer.dense_weight(), layer.bias, padding=1))
    assert layer.last_backend == "split" and calls == []


def test_measured_choice_keeps_the_preferred_backend_within_the_margin(monkeypatch):
    fake = {"fused": 1.00, "split": 0.985, "reference": 2.0}
    monkeypatch.setattr(autotune, "_time_candidates", lambda candidates, rounds: dict(fake))
    names = {name: (lambda: None) for name in fake}
    assert autotune.measured_choice("k1", names, prefer="fused") == "fused"
    fake["split"] = 0.90
    assert autotune.measured_choice("k2", names, prefer="fused") == "split"
    assert autotune.measured_choice("k1", names, prefer="fused") == "fused", "remembered"


def test_layers_with_cached_packed_weights_copy_and_pickle():
    import copy
    import io

    layer = leanconv.HetConv2d(8, 16, 3, padding=1, p=4, backend="packed").eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        expected = layer(x)
    assert "packed" in layer.__dict__["_prepared"]
    clone = copy.deepcopy(layer)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        for other in (clone, loaded):
            assert "_prepared" not in other.__dict__ or not other.__dict__["_prepared"]
            assert torch.equal(other(x), expected)


def test_a_backend_that_fails_while_measured_is_left_out_with_a_warning(monkeypatch):
    def broken():
        raise RuntimeError("no kernel image is available for execution on the device")

    candidates = {"reference": lambda: None, "triton": broken}
    with pytest.warns(RuntimeWarning, match="backend 'triton' failed while being measured"):
        assert autotune.measured_choice("failing-key", candidates, rounds=1) == "reference"
    assert autotune.cache_entries()["failing-key"] == "reference"
    with pytest.raises(RuntimeError, match="no kernel image"), pytest.warns(RuntimeWarning):
        autotune.measured_choice("all-failing-key", {"triton": broken}, rounds=1)
    autotune.clear_cache()


def test_tuning_key_and_layer_memo_separate_autocast():
    x, w = torch.randn(2, 8, 6, 6), torch.randn(8, 2, 3, 3)
    plain = autotune.tuning_key(x, w, 4, "blocked", (1, 1), (1, 1), (1, 1), True, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = autotune.tuning_key(x, w, 4, "blocked", (1, 1), (1, 1), (1, 1), True, False)
        assert autotune.autocast_dtype(x) == torch.bfloat16
    assert plain != mixed and "autocast-None" in plain and "autocast-bfloat16" in mixed
    assert autotune.autocast_dtype(x) is None and not autotune.stream_capturing(x)


def test_auto_on_a_gpu_without_triton_warns_once_and_goes_on(monkeypatch):
    """Where Triton is not installed, auto on a GPU measures the other backends and
    says once why the kernels are skipped (the CPU stands in for the GPU here)."""
    import warnings

    from leanconv.ops import backends

    monkeypatch.setattr(backends, "TRITON_MEASURED_DEVICES", ("cpu",))
    monkeypatch.delitem(backends._REGISTRY, "triton", raising=False)
    monkeypatch.setattr(backends, "_warned", set())
    x = torch.zeros(1, 8, 4, 4)
    with pytest.warns(RuntimeWarning, match="triton backends are skipped.*pip install"):
        names = backends.measured_candidates(x, needs_grad=False)
    assert "triton" not in names and "reference" in names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backends.measured_candidates(x, needs_grad=False)  # said once
