"""The one dispatch path: the deterministic rule's choices, the eager-inference
preparation options held to the reference, the prepared-weight cache, opt-in
measuring, a user-registered backend reaching ``auto``, and the configuration."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

import leanconv
from leanconv.ops import hetconv_direct
from leanconv import config
from leanconv.layers import DepthwiseConv2d
from leanconv.ops import measure
from leanconv.ops.conv_geometry import HetConvGeometry
from leanconv.ops.backends import (
    NCHW_TRAIN_DIRECT_PIXELS, NCHW_TRAIN_DIRECT_WIDE_CHANNELS, NCHW_TRAIN_DIRECT_WIDE_PIXELS, SMALL_CALL_WORK, direct_runs,
    hetconv_rule,
)
from leanconv.ops.registry import Backend, Plan, register_backend, unregister_backend

from helpers import assert_matches_reference


def _plan(training=False, channels_last=False, dtype=torch.float32):
    return Plan("auto", training, channels_last, dtype, not training)


def _geometry(m, n, p, k=3):
    return HetConvGeometry(m, n, (k, k), (1, 1), (k // 2, k // 2), (1, 1), p, "blocked")


# ------------------------------------------------------------------ the rule
# float64: the library forms' part of the rule (the direct kernel runs float32 only)
@pytest.mark.parametrize(
    "shape,m,n,p,k,capturing,expected",
    [
        ((64, 64, 32, 32), 64, 64, 4, 3, False, "split"),  # VGG's first block at batch 64
        ((1, 16, 8, 8), 16, 16, 4, 3, False, "reference"),  # small call: one library call
        ((64, 64, 32, 32), 64, 64, 1, 3, False, "split"),  # P=1: the layer's own weight, one conv
        ((64, 64, 32, 32), 64, 64, 2, 1, False, "reference"),  # 1x1: 1/P + 1/K^2 > 0.8
        ((64, 64, 32, 32), 64, 64, 2, 3, False, "split"),
        ((1, 16, 8, 8), 16, 16, 4, 3, True, "split"),  # traced/compiled/exported: Conv + Conv + Add
    ],
)
def test_rule_choices(shape, m, n, p, k, capturing, expected):
    x = torch.empty(shape, dtype=torch.float64)
    for training in (False, True):  # the same for inference and training, but small calls train with split
        small_training = training and expected == "reference" and x.numel() * n * k * k < SMALL_CALL_WORK
        assert hetconv_rule(x, _geometry(m, n, p, k), _plan(training, dtype=torch.float64), capturing) == (
            "split" if small_training else expected)


@pytest.mark.parametrize("shape", [(64, 64, 32, 32), (1, 16, 8, 8)], ids=["vgg-block", "small-call"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_rule_takes_direct_for_float32_cpu_in_either_format(shape, memory_format):
    """float32 CPU calls in channels-last order, and contiguous ones in inference and in
    training on larger maps, go to the C++ kernel where it builds (small calls train with
    split), also in a graph TorchDynamo captures; a strided view (neither order) keeps the
    library forms."""
    x = torch.empty(shape).contiguous(memory_format=memory_format)
    channels_last = memory_format == torch.channels_last
    g = _geometry(shape[1], shape[1], 4)
    library = "reference" if x.numel() * shape[1] * 9 < SMALL_CALL_WORK else "split"
    small = x.numel() * shape[1] * 9 < SMALL_CALL_WORK
    for training in (False, True):
        plan = _plan(training, channels_last)
        large_map = shape[2] * shape[3] >= NCHW_TRAIN_DIRECT_PIXELS  # NCHW training on small maps: split
        takes_direct = direct_runs(x, g, plan) and (channels_last or not training or large_map) and not (
            training and small)  # small calls train with split
        assert hetconv_rule(x, g, plan, False) == ("direct" if takes_direct else "split" if training else library)
        # torch.compile / torch.export keep the kernel (a registered op); the other captures are split
        assert hetconv_rule(x, g, plan, True) == ("direct" if takes_direct else "split")
    strided = torch.empty(shape[0], shape[1], shape[2], 2 * shape[3])[..., ::2]
    assert hetconv_rule(strided, g, _plan(), False) == library


def test_nchw_training_takes_direct_on_the_maps_the_rule_names():
    plan = _plan(training=True)
    if not direct_runs(torch.empty(1, 8, 4, 4), _geometry(8, 8, 4), plan):
        pytest.skip("the direct kernel is unavailable")
    for channels, side, expected in [(32, 32, "direct"), (32, 16, "split"), (64, 16, "direct"), (128, 8, "split")]:
        assert NCHW_TRAIN_DIRECT_PIXELS == 32 * 32 and NCHW_TRAIN_DIRECT_WIDE_PIXELS == 16 * 16
        assert NCHW_TRAIN_DIRECT_WIDE_CHANNELS == 64
        x = torch.empty(64, channels, side, side)
        assert hetconv_rule(x, _geometry(channels, channels, 4), plan, False) == expected, (channels, side)
        # strided layers train with split whatever their map
        strided = _geometry(channels, channels, 4)._replace(stride=(2, 2))
        assert hetconv_rule(torch.empty(64, channels, 2 * side, 2 * side), strided, plan, False) == "split"


def test_direct_is_left_where_its_work_is_no_smaller_than_the_dense_convolutions():
    from leanconv.ops.backends import DIRECT_MAX_WORK_RATIO, direct_work_ratio

    # 16 channels, P=2, 3x3: on 16 lanes a vector holds both groups (16 + 8 x 8 x 2 = 144 = 16 x 9);
    # on 8 lanes each group fills a vector (16 + 8 x 8 = 80)
    assert direct_work_ratio(_geometry(16, 16, 2), 16) == pytest.approx(1.0)
    assert direct_work_ratio(_geometry(16, 16, 2), 8) == pytest.approx(80 / 144)
    assert direct_work_ratio(_geometry(64, 64, 4), 16) == pytest.approx((64 + 8 * 16) / 576)
    assert DIRECT_MAX_WORK_RATIO == 0.8
    plan = _plan(training=True, channels_last=True)
    x = torch.empty(64, 16, 32, 32).contiguous(memory_format=torch.channels_last)
    if not direct_runs(x, _geometry(16, 16, 2), plan):
        pytest.skip("the direct kernel is unavailable")
    lanes = hetconv_direct.lanes(hetconv_direct.active_isa())
    expected = "direct" if direct_work_ratio(_geometry(16, 16, 2), lanes) <= DIRECT_MAX_WORK_RATIO else "reference"
    assert hetconv_rule(x, _geometry(16, 16, 2), plan, False) == expected
    assert hetconv_rule(x, _geometry(16, 16, 2), plan, True) == ("direct" if expected == "direct" else "split")
    assert hetconv_rule(x, _geometry(16, 16, 4), plan, False) == "direct"


def test_strided_layers_train_with_split():
    g = _geometry(64, 128, 4)._replace(stride=(2, 2))
    x = torch.empty(32, 64, 56, 56).contiguous(memory_format=torch.channels_last)
    if not direct_runs(x, g, _plan(channels_last=True)):
        pytest.skip("the direct kernel is unavailable")
    assert hetconv_rule(x, g, _plan(training=True, channels_last=True), False) == "split"
    assert hetconv_rule(x, g, _plan(training=False, channels_last=True), False) == "direct"


def test_training_calls_of_few_output_pixels_take_split():
    from leanconv.ops.backends import TRAIN_DIRECT_MIN_PIXELS

    g = _geometry(512, 512, 4)
    x = torch.empty(1, 512, 8, 8).contiguous(memory_format=torch.channels_last)  # above the small-call work
    if not direct_runs(x, g, _plan(channels_last=True)):
        pytest.skip("the direct kernel is unavailable")
    assert x.numel() * 512 * 9 >= SMALL_CALL_WORK and 64 < TRAIN_DIRECT_MIN_PIXELS <= 64 * 64
    assert hetconv_rule(x, g, _plan(training=True, channels_last=True), False) == "split"
    assert hetconv_rule(x, g, _plan(training=False, channels_last=True), False) == "direct"
    batch = torch.empty(64, 512, 8, 8).contiguous(memory_format=torch.channels_last)  # 4,096 output pixels
    assert hetconv_rule(batch, g, _plan(training=True, channels_last=True), False) == "direct"


def test_small_call_threshold_is_where_the_rule_says():
    g = _geometry(16, 16, 4)
    plan = _plan(dtype=torch.float64)
    below = torch.empty(1, 16, 8, 8, dtype=torch.float64)
    assert below.numel() * 16 * 9 < SMALL_CALL_WORK and hetconv_rule(below, g, plan, False) == "reference"
    batch = SMALL_CALL_WORK // (16 * 8 * 8 * 16 * 9) + 1
    assert hetconv_rule(torch.empty(batch, 16, 8, 8, dtype=torch.float64), g, plan, False) == "split"


def test_default_never_measures_and_is_the_same_every_call(monkeypatch):
    monkeypatch.setattr(measure, "measured_choice", lambda *a, **k: pytest.fail("measured without being asked"))
    layer = leanconv.HetConv2d(64, 64, 3, padding=1, p=4)
    x = torch.randn(40, 64, 12, 12)
    choices = set()
    for _ in range(3):
        with torch.no_grad():
            layer(x)
        choices.add(layer.last_backend)
    assert choices == {hetconv_rule(x, layer._geometry, _plan(), False)}


# ------------------------------------- eager inference against the reference
CASES = [
    dict(m=8, n=12, p=4, k=3, stride=1, padding=1, layout="blocked"),
    dict(m=8, n=8, p=2, k=3, stride=2, padding=1, layout="shifted"),
    dict(m=12, n=6, p=3, k=5, stride=(2, 1), padding=(1, 2), layout="shifted"),
    dict(m=8, n=16, p=4, k=3, stride=1, padding=0, layout="blocked"),
]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_split_inference_paths_match_reference(case, channels_last, mode):
    """The cached paths (in-place add; oneDNN packing with a post-op on channels-last)."""
    torch.manual_seed(0)
    case = dict(case)
    m, n, k = case.pop("m"), case.pop("n"), case.pop("k")
    layer = leanconv.HetConv2d(m, n, k, backend="split", **case).eval()
    x = torch.randn(3, m, 9, 8)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    context = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with context:
        out = layer(x)
        expected = F.conv2d(x, layer.dense_weight(), layer.bias, layer.stride, layer.padding)
        assert_matches_reference(out, expected)
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert torch.equal(layer(x), out)  # the cached weights reproduce the first call


@pytest.mark.parametrize("layout", ["blocked", "shifted"])
def test_packed_split_weights_are_counted_by_flop_counter(layout):
    """Under a torch dispatch mode the oneDNN-packed path runs its unpacked weights:
    FlopCounterMode counts the grouped KxK and the 1x1 convolution (the 1x1 with
    its zero diagonal: M/P K^2 + M MACs per output)."""
    from torch.utils.flop_counter import FlopCounterMode

    layer = leanconv.HetConv2d(16, 16, 3, padding=1, p=4, layout=layout, backend="split").eval()
    x = torch.randn(2, 16, 6, 6).to(memory_format=torch.channels_last)
    counter = FlopCounterMode(display=False)
    with torch.no_grad():
        first = layer(x)
        assert _entry(layer).prepared.packed or not torch.backends.mkldnn.is_available()
        with counter:
            second = layer(x)
    assert_matches_reference(second, first)
    assert second.is_contiguous(memory_format=torch.channels_last)
    assert counter.get_total_flops() == 2 * 2 * 36 * 16 * (4 * 9 + 16)


DEPTHWISE_CASES = [
    dict(in_channels=16, out_channels=16, kernel_size=3, padding=1),
    dict(in_channels=8, out_channels=16, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2)),  # depth multiplier 2
    dict(in_channels=6, out_channels=6, kernel_size=3, padding=2, dilation=2, bias=False),
    dict(in_channels=5, out_channels=5, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=4, out_channels=4, kernel_size=4, padding="same"),  # uneven 'same': never packed
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_depthwise_packed_weights_match_and_keep_the_memory_format(case, channels_last):
    """Small eager CPU float32 calls run with the weight prepacked for oneDNN; the
    output equals nn.Conv2d's, in the input's memory format, call after call."""
    from leanconv.ops.backends import PackedDepthwise

    torch.manual_seed(0)
    layer = DepthwiseConv2d(**case).eval()
    plain = torch.nn.Conv2d(groups=case["in_channels"], **case).eval()
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, case["in_channels"], 9, 7)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        out, expected = layer(x), plain(x)
        assert_matches_reference(out, expected)
        assert out.stride() == expected.stride()
        assert torch.equal(layer(x), out)
        unbatched = layer(x[0])
        assert_matches_reference(unbatched, plain(x[0]))
    packable = case.get("padding") != "same" and torch.backends.mkldnn.is_available()
    entries = layer.__dict__["_dispatcher"].entries
    assert len(entries) == 2 and all(isinstance(e.prepared, PackedDepthwise) == packable for e in entries.values())


def test_depthwise_packing_is_for_small_cached_float32_calls_only():
    from leanconv.ops.backends import PACKED_DEPTHWISE_MAX_OUTPUT, PackedDepthwise

    if not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN not built in")
    layer = DepthwiseConv2d(8, 8, 3, padding=1)
    side = int((PACKED_DEPTHWISE_MAX_OUTPUT // 8) ** 0.5)
    small, large = torch.randn(1, 8, side, side), torch.randn(1, 8, side + 1, side + 1)
    double = DepthwiseConv2d(8, 8, 3, padding=1).double()
    with torch.no_grad():
        layer(small), layer(large), double(small.double())
    prepared = {key[0]: entry.prepared for key, entry in layer.__dict__["_dispatcher"].entries.items()}
    assert isinstance(prepared[small.shape], PackedDepthwise)
    assert prepared[large.shape] is layer.weight
    assert _entry(double).prepared is double.weight
    x = small.requires_grad_()
    out = layer(x)  # autograd: the parameter itself, differentiable
    out.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    with torch.no_grad():  # an in-place update rebuilds the packed weight
        before = layer(small)
        layer.weight.mul_(2)
        after = layer(small)
    assert_matches_reference(after, F.conv2d(small, layer.weight, layer.bias, 1, 1, 1, 8))
    assert not torch.allclose(before, after)
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)  # a dispatch mode sees F.conv2d, which it knows, not oneDNN's op
    with torch.no_grad(), counter:
        assert_matches_reference(layer(small), after)
    assert counter.get_total_flops() == 2 * small.numel() * 9
    with torch.no_grad():  # leanconv.functional caches nothing and packs nothing
        assert_matches_reference(leanconv.functional.depthwise_conv2d(small, layer.weight, layer.bias, padding=1),
                                 after)


def _entry(layer):
    (entry,) = [e for e in layer.__dict__["_dispatcher"].entries.values() if e.plan.cache]
    return entry


@pytest.mark.parametrize("backend", ["split", "reference"])
def test_prepared_weights_are_rebuilt_when_a_parameter_changes(backend):
    layer = leanconv.HetConv2d(8, 8, 3, padding=1, p=4, backend=backend).eval()
    x = torch.randn(2, 8, 6, 6)

    def check():
        with torch.no_grad():
            assert_matches_reference(layer(x), F.conv2d(x, layer.dense_weight(), layer.bias, padding=1))

    check()
    prepared = _entry(layer).prepared
    check()
    assert _entry(layer).prepared is prepared, "reused while nothing changed"
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).sum().backward()
    optimizer.step()
    check()  # an optimizer step
    other = leanconv.HetConv2d(8, 8, 3, padding=1, p=4)
    layer.load_state_dict(other.state_dict())
    check()  # load_state_dict
    layer.double()
    x = x.double()
    check()  # .to(dtype)
    layer.pointwise_weight = torch.nn.Parameter(torch.randn_like(layer.pointwise_weight))
    check()  # a parameter replaced


def test_copies_and_pickles_leave_the_cache_behind():
    layer = leanconv.HetConv2d(8, 8, 3, padding=1, p=4, backend="split").eval()
    x = torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = layer(x)
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert "_dispatcher" not in twin.__dict__
        with torch.no_grad():
            assert torch.equal(twin(x), expected)
    assert "_dispatcher" not in "".join(layer.state_dict())


# ------------------------------------------------------ user-registered backend
def _count_calls(calls):
    def prepare(params, geometry, plan, input_shape):
        weight, pointwise = params
        return leanconv.ops.materialize_dense_weight(weight, pointwise, geometry.p, geometry.layout)

    def run(x, dense, bias, geometry, plan):
        calls.append(plan.training)
        return F.conv2d(x, dense, bias, geometry.stride, geometry.padding, geometry.dilation)

    return prepare, run


def test_a_registered_backend_reaches_auto_through_prefer():
    calls = []
    prepare, run = _count_calls(calls)
    register_backend(Backend("mine", "hetconv", prepare, run, prefer=lambda x, g, plan: g.p == 4,
                             description="a test backend"))
    try:
        assert "mine" in leanconv.backend_names()
        layer = leanconv.HetConv2d(8, 8, 3, padding=1, p=4)
        x = torch.randn(2, 8, 5, 5, requires_grad=True)
        out = layer(x)
        out.sum().backward()
        assert layer.last_backend == "mine" and calls == [True]
        leanconv.HetConv2d(8, 8, 3, padding=1, p=2)(x)  # prefer says no: the built-in rule decides
        assert calls == [True]
        assert_matches_reference(out, F.conv2d(x, layer.dense_weight(), layer.bias, padding=1))
    finally:
        unregister_backend("hetconv", "mine")
    layer(x)
    assert layer.last_backend != "mine", "the layer re-plans after the backend is gone"


def test_a_registered_backend_is_measured_when_measuring_is_on(tmp_path, monkeypatch):
    calls = []
    prepare, run = _count_calls(calls)
    register_backend(Backend("mine", "hetconv", prepare, run, devices=("cpu",), training=False))
    monkeypatch.setattr(measure, "_time_candidates", lambda candidates, rounds: {n: 1.0 for n in candidates})
    timed = []
    original = measure.measured_choice
    monkeypatch.setattr(measure, "measured_choice",
                        lambda key, candidates, **kw: timed.append(sorted(candidates)) or original(key, candidates, **kw))
    measure.clear_cache()
    try:
        layer = leanconv.HetConv2d(8, 8, 3, padding=1, p=4).eval()
        with config.benchmarking(), torch.no_grad():
            layer(torch.randn(2, 8, 5, 5))
        direct = ["direct"] if hetconv_direct.available() else []  # the C++ kernel, where it builds
        assert timed == [sorted(["mine", "reference", "split", *direct])]  # triton is measured on CUDA only
        with config.benchmarking():  # training: 'mine' declares inference only
            layer(torch.randn(2, 8, 5, 5, requires_grad=True))
        assert timed[-1] == sorted(["reference", "split", *direct])
    finally:
        unregister_backend("hetconv", "mine")
        measure.clear_cache()


def test_a_named_backend_that_cannot_run_the_call_says_why():
    calls = []
    prepare, run = _count_calls(calls)
    register_backend(Backend("infer-only", "hetconv", prepare, run, training=False))
    try:
        layer = leanconv.HetConv2d(8, 8, 3, padding=1, p=4, backend="infer-only")
        with pytest.raises(ValueError, match="backend 'infer-only' cannot run this call: it runs inference only"):
            layer(torch.randn(1, 8, 5, 5, requires_grad=True))
    finally:
        unregister_backend("hetconv", "infer-only")


def test_bad_backend_definitions_are_refused():
    prepare, run = _count_calls([])
    with pytest.raises(ValueError, match="Backend.op must be one of"):
        Backend("x", "conv3d", prepare, run)
    with pytest.raises(ValueError, match="other than 'auto'"):
        Backend("auto", "hetconv", prepare, run)
    with pytest.raises(ValueError, match="memory_formats"):
        Backend("x", "hetconv", prepare, run, memory_formats=("nhwc",))
    with pytest.raises(TypeError, match="expected a leanconv.ops.registry.Backend"):
        register_backend("x")


# ------------------------------------------------------------- configuration
def test_environment_is_read_once(monkeypatch, leanconv_env):
    leanconv_env("LEANCONV_BACKEND", "reference")
    assert config.backend() == "reference"
    monkeypatch.setenv("LEANCONV_BACKEND", "split")  # after first use: not seen
    assert config.backend() == "reference"
    leanconv.set_backend("split")
    assert config.backend() == "split"


def test_benchmark_switch_environment_setter_and_context(leanconv_env):
    assert config.benchmark_enabled() is False
    leanconv_env("LEANCONV_BENCHMARK", "1")
    assert config.benchmark_enabled() is True
    with config.benchmarking(False):
        assert config.benchmark_enabled() is False
    config.set_benchmark(False)
    assert config.benchmark_enabled() is False
    with pytest.raises(TypeError, match="set_benchmark: enabled must be True or False, got 'yes'"):
        config.set_benchmark("yes")
    leanconv_env("LEANCONV_BENCHMARK", "maybe")
    with pytest.raises(ValueError, match="LEANCONV_BENCHMARK must be one of"):
        config.benchmark_enabled()


def test_nothing_writes_the_environment(monkeypatch):
    import os

    before = dict(os.environ)
    leanconv.set_backend("split")
    with leanconv.use_backend("reference"), config.benchmarking():
        leanconv.HetConv2d(8, 8, 3, padding=1, p=4)(torch.randn(1, 8, 5, 5))
    assert dict(os.environ) == before


def test_a_layer_built_under_inference_mode_runs_without_a_cache():
    with torch.inference_mode():
        layer = leanconv.HetConv2d(8, 8, 3, padding=1, p=4, backend="split").eval()
        x = torch.randn(2, 8, 6, 6)
        assert_matches_reference(layer(x), F.conv2d(x, layer.dense_weight(), layer.bias, padding=1))
        layer.weight.mul_(2.0)  # in-place on an inference tensor: nothing cached can go stale
        assert_matches_reference(layer(x), F.conv2d(x, layer.dense_weight(), layer.bias, padding=1))


def test_index_tables_first_built_under_inference_mode_serve_training():
    from leanconv.ops import hetconv_layout

    hetconv_layout._index_tables.cache_clear()
    hetconv_layout._index_tables_on.cache_clear()
    layer = leanconv.HetConv2d(12, 6, 3, padding=1, p=3, layout="shifted", backend="reference")
    x = torch.randn(2, 12, 5, 5)
    with torch.inference_mode():
        layer(x)
    layer(x.requires_grad_()).sum().backward()  # the cached tables are not inference tensors
    assert layer.weight.grad is not None
