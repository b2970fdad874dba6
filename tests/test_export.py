"""Export: every layer kind and converted models to ONNX (opset >= 17) checked in
onnxruntime, HetConv as a small graph (node counts), TorchScript, torch.export,
and the ``leanconv export`` command."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import leanconv
from leanconv.conversion import convert
from leanconv.export import HetConvExportForm, export_onnx, export_program, export_torchscript, prepare_for_export, run_onnx
from leanconv.layers import HetConv2d, ApproximateHetConv2d, make_conv

from helpers import assert_matches_reference, optional_module, requires

onnx = optional_module("onnx")
requires_onnx = requires(onnx, optional_module("onnxruntime"), optional_module("onnxscript"),
                         reason="the onnx extra is not installed (pip install 'leanconv[onnx]')")

LOOPING_OPS = {"Loop", "Scan", "If", "SequenceConstruct", "ConcatFromSequence", "ScatterND", "ScatterElements"}

HETCONV_CASES = [
    (dict(p=4, padding=1), {"Conv": 2, "Add": 1}),
    (dict(p=4, padding=1, layout="shifted"), {"Conv": 2, "Add": 1, "Gather": 2}),
    (dict(p=4, padding=1, stride=2), {"Conv": 2, "Add": 1}),
    (dict(p=2, padding=0, stride=2), {"Conv": 2, "Add": 1, "Slice": "<= 4"}),  # 1x1 branch cropped to the centre taps
    # the 1x1 branch reads the mode-padded input under each window's centre: cropped to it
    (dict(p=2, padding=2, dilation=2, padding_mode="reflect"), {"Conv": 2, "Add": 1, "Pad": 1, "Slice": "<= 4"}),
    (dict(p=1, padding=1), {"Conv": 1}),
]


def case_id(options) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items())


@pytest.mark.parametrize("options,expected", HETCONV_CASES, ids=[case_id(c[0]) for c in HETCONV_CASES])
def test_hetconv_export_form_is_exact(options, expected):
    layer = HetConv2d(8, 12, 3, **options)
    x = torch.randn(2, 8, 9, 10)
    with torch.no_grad():
        assert_matches_reference(HetConvExportForm(layer)(x) if layer.p > 1 else layer.to_conv2d()(x), layer(x))


@pytest.mark.parametrize("options,expected", HETCONV_CASES, ids=[case_id(c[0]) for c in HETCONV_CASES])
@requires_onnx
def test_hetconv_onnx_small_graph(options, expected, tmp_path):
    layer = HetConv2d(8, 12, 3, **options)
    result = export_onnx(layer, torch.randn(2, 8, 9, 10), tmp_path / "het.onnx")
    assert set(result.node_counts) == set(expected), result
    for op, count in expected.items():
        if isinstance(count, str):  # the exporter may drop slices that are no-ops for the traced shape
            assert result.node_counts[op] <= int(count.split()[-1]), result
        else:
            assert result.node_counts[op] == count, result
    assert result.opset >= 17 and result.max_abs_diff <= result.tolerance


@requires_onnx
def test_hetconv_dense_form(tmp_path):
    result = export_onnx(HetConv2d(8, 12, 3, padding=1, p=4), torch.randn(1, 8, 6, 6), tmp_path / "d.onnx", hetconv_form="dense")
    assert result.node_counts == {"Conv": 1}


LAYERS = [
    ("standard", {}), ("dsc", dict(with_bn=True)), ("dsc", {}), ("bsconv_u", dict(with_bn=True)),
    ("bsconv_s", dict(with_bn=True)), ("gwpw", dict(g=2, with_bn=True)),
]


@pytest.mark.parametrize("kind,options", LAYERS, ids=[k + ("-bn" if o.get("with_bn") else "") for k, o in LAYERS])
@requires_onnx
def test_every_layer_kind_exports_and_matches(kind, options, tmp_path):
    layer = make_conv(kind, 8, 12, 3, stride=2, padding=1, **options)
    for m in layer.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    result = export_onnx(layer.eval(), torch.randn(2, 8, 9, 9), tmp_path / f"{kind}.onnx")
    assert not LOOPING_OPS & set(result.node_counts)
    assert result.node_counts.get("Conv", 0) == (1 if kind == "standard" else 2)  # BN folded, BSConv-S merged
    assert "BatchNormalization" not in result.node_counts


@requires_onnx
def test_seed_hetconv_exports(tmp_path):
    result = export_onnx(ApproximateHetConv2d(8, 12, 3, p=4), torch.randn(1, 8, 7, 7), tmp_path / "seed.onnx")
    assert result.node_counts == {"Conv": 2, "Add": 1}


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


@pytest.mark.parametrize("kind,options", [
    ("hetconv", dict(p=4)), ("dsc", {}), ("bsconv_u", {}), ("bsconv_s", dict(with_bn=True)), ("gwpw", dict(g=4)),
])
@requires_onnx
@pytest.mark.slow
def test_converted_model_onnx_dynamic_batch(kind, options, tmp_path):
    model = convert(small_net(), kind, **options).eval()
    path = tmp_path / "m.onnx"
    result = export_onnx(model, None, path, input_size=(3, 16, 16))
    assert "BatchNormalization" not in result.node_counts
    x = torch.randn(5, 3, 16, 16)  # another batch size than the export's
    with torch.no_grad():
        assert_matches_reference(run_onnx(path, x), model(x))


@requires_onnx
def test_legacy_torchscript_onnx_exporter(tmp_path):
    model = convert(small_net(), "hetconv", p=4).eval()
    result = export_onnx(model, None, tmp_path / "legacy.onnx", input_size=(3, 16, 16), dynamo=False, opset=17)
    assert result.opset == 17 and result.node_counts["Conv"] == 5  # stem + 2 x (grouped + 1x1)


@requires_onnx
def test_opset_below_17_refused(tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_onnx(small_net(), None, tmp_path / "x.onnx", input_size=(3, 8, 8), opset=13)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("kind,options", [("hetconv", dict(p=4)), ("hetconv", dict(p=4, layout="shifted")), ("bsconv_s", dict(with_bn=True))])
@requires_onnx
def test_torchscript_and_torch_export(kind, options, tmp_path):
    model = convert(small_net(), kind, **options).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        reference = model(x)
        traced = export_torchscript(model, x, tmp_path / "m.ts")
        assert_matches_reference(traced(x), reference)
        assert_matches_reference(torch.jit.load(str(tmp_path / "m.ts"))(x), reference)
        program = export_program(model, x, tmp_path / "m.pt2")
        assert_matches_reference(program.module()(x), reference)
        assert_matches_reference(torch.export.load(str(tmp_path / "m.pt2")).module()(x), reference)


def test_prepare_keeps_outputs_and_leaves_original():
    model = convert(small_net(), "hetconv", p=4).train()
    prepared = prepare_for_export(model)
    assert model.training and not prepared.training
    assert not any(isinstance(m, (HetConv2d, nn.BatchNorm2d)) for m in prepared.modules())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_matches_reference(prepared(x), model.eval()(x))


def zoo():
    models = pytest.importorskip("leanconv.models")
    if not hasattr(models, "create"):
        pytest.skip("leanconv.models.create is not available yet")
    return models


ZOO_KINDS = [("hetconv", dict(p=4)), ("dsc", {}), ("bsconv_u", {}), ("bsconv_s", dict(with_bn=True)), ("gwpw", dict(g=4))]


@pytest.mark.parametrize("kind,options", ZOO_KINDS, ids=[k for k, _ in ZOO_KINDS])
@requires_onnx
@pytest.mark.slow
def test_zoo_vgg16_cifar_every_kind_onnx(kind, options, tmp_path):
    models = zoo()
    model = convert(models.create("vgg16_cifar", width=0.25), kind, **options).eval()
    result = export_onnx(model, None, tmp_path / "vgg.onnx", input_size=(3, 32, 32))
    assert not LOOPING_OPS & set(result.node_counts)


def zoo_names() -> list[str]:
    try:
        from leanconv import models
    except ImportError:
        return []
    return [n for n in getattr(models, "names", lambda: [])() if n != "vgg16_cifar"]


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo_names() or ["(no zoo)"])
@requires_onnx
def test_every_zoo_model_exports_converted(name, tmp_path):
    models = zoo()
    if name not in models.names():
        pytest.skip("no zoo")
    size = (3, 32, 32) if "cifar" in name else (3, 64, 64)
    model = convert(models.create(name, num_classes=10, width=0.25), "hetconv", p=2, p_policy="largest").eval()
    result = export_onnx(model, None, tmp_path / f"{name}.onnx", input_size=size)
    assert not LOOPING_OPS & set(result.node_counts)
    assert "BatchNormalization" not in result.node_counts or name.startswith("wrn")  # pre-activation BN stays


# ---------------------------------------------------------------------- CLI
@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_export_models.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        def small():
            return nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
            )
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_export_models:small"
    sys.modules.pop("user_export_models", None)


@requires_onnx
def test_cli_export_with_check(user_module, tmp_path, capsys):
    from leanconv.cli import main

    out = tmp_path / "m.onnx"
    code = main(["export", user_module, "--conv", "hetconv", "--p", "4", "--input-size", "3,16,16",
                 "--onnx", str(out), "--check", "--torch-export", str(tmp_path / "m.pt2")])
    assert code == 0 and out.exists()
    text = capsys.readouterr().out
    assert "onnxruntime vs PyTorch" in text and "OK" in text and "Conv x3" in text


@requires_onnx
def test_cli_export_from_checkpoint(user_module, tmp_path, capsys):
    from leanconv.cli import main

    ckpt = tmp_path / "c.pt"
    assert main(["convert", user_module, "--conv", "bsconv_u", "--with-bn", "--out", str(ckpt)]) == 0
    assert main(["export", "--checkpoint", str(ckpt), "--input-size", "3,16,16", "--onnx", str(tmp_path / "c.onnx"), "--check"]) == 0
    assert "OK" in capsys.readouterr().out


@requires_onnx
def test_cli_export_errors(user_module, tmp_path, capsys):
    from leanconv.cli import main

    assert main(["export", user_module, "--conv", "dsc", "--onnx", str(tmp_path / "x.onnx")]) == 2
    assert "--input-size" in capsys.readouterr().err
    assert main(["export", user_module, "--conv", "dsc", "--input-size", "3,8,8"]) == 2
    assert "nothing to do" in capsys.readouterr().err


def test_prepare_turns_depthwise_layers_into_plain_convolutions():
    from leanconv.layers import DepthwiseConv2d

    backend = "triton" if "triton" in leanconv.backend_names("depthwise") else "torch"
    model = nn.Sequential(
        leanconv.DSConv2d(3, 8, 3, padding=1, with_bn=True, depthwise_backend=backend),
        leanconv.BSConvU2d(8, 8, 3, padding=1, depthwise_backend=backend),
    )
    prepared = prepare_for_export(model)
    assert not any(isinstance(m, DepthwiseConv2d) for m in prepared.modules())
    assert sum(type(m) is nn.Conv2d and m.groups > 1 for m in prepared.modules()) == 2
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_matches_reference(prepared(x), model.eval()(x))


@pytest.mark.parametrize("options", [dict(p=4, stride=2, padding=1), dict(p=4, stride=2, padding=0),
                                     dict(p=2, stride=(2, 1), padding=(2, 0), layout="shifted")],
                         ids=["stride2-pad1", "stride2-pad0", "shifted-stride21-pad20"])
def test_export_form_holds_for_any_input_size(options):
    """The split form's crops and pads are constants of the geometry: a program exported
    with dynamic height and width is right at sizes other than the traced one."""
    layer = HetConv2d(8, 12, 3, **options).eval()
    form = prepare_for_export(layer)
    auto = torch.export.Dim.AUTO
    program = torch.export.export(form, (torch.randn(2, 8, 16, 16),), dynamic_shapes=({2: auto, 3: auto},))
    for size in ((9, 10), (17, 6), (32, 31)):
        x = torch.randn(2, 8, *size)
        with torch.no_grad():
            assert_matches_reference(program.module()(x), layer(x))
