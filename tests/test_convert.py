"""leanconv.convert: which layers are replaced and why, faithful hyper-parameters,
shared modules, the report, weight transfer, the official bsconv ResNet-20,
the zoo, the CLI and its checkpoints, and bad input."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import leanconv
from leanconv.accounting import layer_macs
from leanconv.conversion import convert, load_converted
from leanconv.layers import BSConvU2d, DSConv2d, GWPWConv2d, HetConv2d

from helpers import assert_matches_reference, optional_module, requires


def n_params(module: nn.Module) -> int:
    return sum(t.numel() for t in module.parameters())


class SameConv(nn.Conv2d):
    """A Conv2d subclass, like timm's "same"-padding convolutions."""


class Block(nn.Module):
    def __init__(self, shared: nn.Conv2d):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.shared = shared

    def forward(self, x):
        return self.shared(torch.relu(self.bn(self.conv(x))))


class OddNet(nn.Module):
    """Strided, 5x5, dilated, reflect-padded, 1x1, grouped, even, 1x3 and subclass
    convolutions, nested containers and one conv instance under two names."""

    def __init__(self):
        super().__init__()
        shared = nn.Conv2d(16, 16, 3, padding=1)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(
            Block(shared),
            nn.ModuleDict({"inner": nn.Sequential(Block(shared))}),
        )
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.big = nn.Conv2d(32, 32, 5, padding=2, padding_mode="reflect")
        self.dilated = nn.Conv2d(32, 32, 3, padding=2, dilation=2)
        self.point = nn.Conv2d(32, 32, 1)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.even = nn.Conv2d(32, 32, 2, padding=1)
        self.row = nn.Conv2d(32, 32, (1, 3), padding=(0, 1))
        self.sub = SameConv(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = self.body[0](x)
        x = self.body[1]["inner"](x)
        x = self.down(x)
        x = self.dilated(self.big(x))
        x = self.grouped(self.point(x))
        x = self.even(x)[..., :-1, :-1]
        x = self.sub(self.row(x))
        return self.head(x.mean((-2, -1)))


def skipped_reasons(report) -> dict[str, str]:
    return {s.name: s.reason for s in report.skipped}


def test_odd_model_what_is_replaced_and_why():
    model = OddNet()
    converted, report = convert(model, "hetconv", p=2, return_report=True)
    replaced = {r.name for r in report.replaced}
    assert replaced == {
        "body.0.conv", "body.0.shared", "body.1.inner.0.conv", "down", "big", "dilated",
    }
    reasons = skipped_reasons(report)
    assert "stem" in reasons["stem"]
    assert "1x1" in reasons["point"]
    assert "groups=4" in reasons["grouped"]
    assert "2x2" in reasons["even"] and "1x3" in reasons["row"]
    assert "subclass" in reasons["sub"] and "SameConv" in reasons["sub"]
    # Faithful hyper-parameters.
    for name in ("down", "big", "dilated"):
        old, new = model.get_submodule(name), converted.get_submodule(name)
        assert isinstance(new, HetConv2d) and new.p == 2
        assert (new.in_channels, new.out_channels) == (old.in_channels, old.out_channels)
        assert new.kernel_size == old.kernel_size and new.stride == old.stride
        assert new._padding_pair == old.padding and new.dilation == old.dilation
        assert new.padding_mode == old.padding_mode and (new.bias is None) == (old.bias is None)
    # Untouched layers are the same objects' copies, unchanged.
    assert type(converted.point) is nn.Conv2d and type(converted.sub) is SameConv
    assert converted(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_shared_module_replaced_once_and_stays_shared():
    model = OddNet()
    converted, report = convert(model, "dsc", return_report=True)
    first, second = converted.body[0].shared, converted.body[1]["inner"][0].shared
    assert isinstance(first, DSConv2d) and first is second
    record = next(r for r in report.replaced if r.name == "body.0.shared")
    assert record.aliases == ("body.1.inner.0.shared",)
    assert sum(r.name == "body.0.shared" for r in report.replaced) == 1


def test_copy_by_default_inplace_on_request():
    model = OddNet()
    converted = convert(model, "bsconv_u")
    assert type(model.down) is nn.Conv2d and isinstance(converted.down, BSConvU2d)
    same = convert(model, "bsconv_u", inplace=True)
    assert same is model and isinstance(model.down, BSConvU2d)


def test_subclasses_on_request():
    converted, report = convert(OddNet(), "gwpw", groups=4, convert_subclasses=True, return_report=True)
    assert isinstance(converted.sub, GWPWConv2d)
    assert "SameConv" in next(r.note for r in report.replaced if r.name == "sub")


@pytest.mark.parametrize("kind,options", [
    ("hetconv", dict(p=4)), ("dsc", dict(with_bn=True)), ("bsconv_u", {}), ("bsconv_s", dict(p=0.5, with_bn=True)),
    ("gwpw", dict(g=2)),
], ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_train_flag_device_dtype_kept(kind, options):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3, stride=2, bias=False), nn.Conv2d(16, 16, 3))
    model = model.to(torch.float64)
    model[1].eval()
    converted = convert(model, kind, **options)
    assert converted[1].training is False and converted[2].training is True
    assert all(t.dtype == torch.float64 for t in converted.parameters())
    for module in converted[1].modules():
        assert module.training is False
    y = converted(torch.randn(2, 3, 13, 13, dtype=torch.float64))
    assert y.shape == model(torch.randn(2, 3, 13, 13, dtype=torch.float64)).shape


def test_include_exclude_patterns():
    model = OddNet()
    _, report = convert(model, "hetconv", p=2, include="body.*", exclude=["*.shared"], return_report=True)
    assert {r.name for r in report.replaced} == {"body.0.conv", "body.1.inner.0.conv"}
    reasons = skipped_reasons(report)
    assert "include" in reasons["down"] and "exclude pattern '*.shared'" in reasons["body.0.shared"]


def test_skip_stem_module_order_and_execution_order():
    class LateStem(nn.Module):
        def __init__(self):
            super().__init__()
            self.later = nn.Conv2d(8, 8, 3, padding=1)
            self.first = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            return self.later(self.first(x))

    # Without a shape pass: the first conv in registration order.
    _, report = convert(LateStem(), "dsc", return_report=True)
    assert "stem" in skipped_reasons(report)["later"]
    # With input_size: the first conv that runs, on the image channels.
    _, report = convert(LateStem(), "dsc", input_size=(3, 8, 8), return_report=True)
    assert "stem" in skipped_reasons(report)["first"] and [r.name for r in report.replaced] == ["later"]
    _, report = convert(LateStem(), "dsc", skip_stem=False, return_report=True)
    assert len(report.replaced) == 2


def test_p_policy_skip_and_largest():
    model = nn.Sequential(nn.Conv2d(3, 12, 3), nn.Conv2d(12, 24, 3), nn.Conv2d(24, 24, 3), nn.Conv2d(24, 9, 3))
    _, report = convert(model, "hetconv", p=8, return_report=True)
    assert [r.name for r in report.replaced] == ["2"]
    assert "p=8 does not divide in_channels=12" in skipped_reasons(report)["1"]
    converted, report = convert(model, "hetconv", p=8, p_policy="largest", return_report=True)
    assert converted[1].p == 6 and converted[2].p == 8 and converted[3].p == 3
    assert "largest divisor <= 8" in next(r.note for r in report.replaced if r.name == "1")
    grouped = convert(model, "gwpw", groups=8, p_policy="largest")
    assert grouped[1].groups == 6 and grouped[3].groups == 8


def test_report_contents_params_and_macs():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.Conv2d(32, 32, 1))
    converted, report = convert(model, "hetconv", p=4, input_size=(3, 16, 16), return_report=True)
    (record,) = report.replaced
    assert record.name == "2" and record.params_before == 16 * 32 * 9 + 32
    assert record.params_after == n_params(converted[2]) == 32 * (4 * 9 + 12) + 32
    assert record.macs_before == 8 * 8 * 32 * 16 * 9
    assert record.macs_after == 8 * 8 * 32 * (4 * 9 + 12)  # R(P) = 1/P + (1 - 1/P)/K^2 of the above
    assert record.macs_after / record.macs_before == pytest.approx(1 / 4 + (1 - 1 / 4) / 9)
    assert report.params_before == n_params(model) and report.params_after == n_params(converted)
    assert report.replaced_macs_before == record.macs_before
    text = str(report)
    assert "replaced (1)" in text and "stem" in text and "1x1" in text and "FLOPs = 2 x MACs" in text
    json.dumps(report.to_dict())
    # Without input_size MACs are left out, and the report says how to get them.
    _, bare = convert(model, "hetconv", p=4, return_report=True)
    assert bare.replaced[0].macs_before is None and "input_size" in str(bare)


def test_verbose_prints_report(capsys):
    convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)), "dsc", verbose=True)
    assert "replaced (1)" in capsys.readouterr().out


@pytest.mark.parametrize("kind,options", [("dsc", {}), ("bsconv_u", {}), ("bsconv_s", dict(p=0.5)), ("gwpw", dict(g=2))])
def test_layer_macs_of_separable_layers(kind, options):
    layer = leanconv.make_conv(kind, 8, 12, 3, stride=2, padding=1, **options)
    macs, out = layer_macs(layer, (9, 9))
    assert out == (5, 5)
    if kind == "dsc":
        assert macs == 25 * 8 * 9 + 25 * 8 * 12
    if kind == "bsconv_u":
        assert macs == 81 * 8 * 12 + 25 * 12 * 9  # the 1x1 runs at input resolution
    if kind == "bsconv_s":
        assert macs == 81 * 4 * (8 + 12) + 25 * 12 * 9
    if kind == "gwpw":
        assert macs == 25 * 8 * 4 * 9 + 25 * 8 * 12


# ---------------------------------------------------------------- weight transfer
@pytest.mark.parametrize("layout", ["blocked", "shifted"])
def test_transfer_hetconv_keeps_kxk_kernels_and_centre_taps(layout):
    old = nn.Conv2d(8, 12, 3, padding=1, dtype=torch.float64)
    new = convert(old, "hetconv", p=4, layout=layout, transfer_weights=True)
    dense = new.dense_weight()
    mask = (dense != 0)
    # Every weight HetConv keeps is the old weight; the rest are zero.
    torch.testing.assert_close(dense[mask], old.weight.detach()[mask])
    assert (dense[:, :, 1, 1] == old.weight.detach()[:, :, 1, 1]).all()  # centre taps everywhere
    assert int(mask.sum()) == 12 * (2 * 9 + 6)
    torch.testing.assert_close(new.bias, old.bias)
    # Exact when the dense weight already has HetConv's pattern.
    with torch.no_grad():
        old.weight.copy_(dense * 2)
    again = convert(old, "hetconv", p=4, layout=layout, transfer_weights=True)
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    assert_matches_reference(again(x), old(x))


def low_rank_conv(kind: str) -> nn.Conv2d:
    """A dense conv whose weight the kind's factorisation represents exactly."""
    n, m, k = 12, 8, 3
    conv = nn.Conv2d(m, n, k, padding=1, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    if kind == "dsc":
        weight = rand(n, m, 1, 1) * rand(1, m, k, k)
    elif kind == "gwpw":  # 2 groups of 4 channels
        pw, gw = rand(n, m), rand(m, m // 2, k, k)
        weight = torch.cat([torch.einsum("nj,jckl->nckl", pw[:, g_ * 4:(g_ + 1) * 4], gw[g_ * 4:(g_ + 1) * 4]) for g_ in range(2)], 1)
    elif kind == "bsconv_u":
        weight = rand(n, m, 1, 1) * rand(n, 1, k, k)
    else:  # bsconv_s, M' = 4
        weight = (rand(n, 4) @ rand(4, m))[:, :, None, None] * rand(n, 1, k, k)
    with torch.no_grad():
        conv.weight.copy_(weight)
    return conv


@pytest.mark.parametrize("kind,options", [
    ("dsc", {}), ("gwpw", dict(g=2)), ("bsconv_u", {}), ("bsconv_s", dict(p=0.5)), ("dsc", dict(with_bn=True)),
], ids=["dsc", "gwpw", "bsconv_u", "bsconv_s", "dsc-bn"])
def test_transfer_factorisation_is_exact_on_low_rank_weights(kind, options):
    old = low_rank_conv(kind)
    new, report = convert(old, kind, transfer_weights=True, return_report=True, **options)
    assert report.replaced[0].transfer_error < 1e-10
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    assert_matches_reference(new.eval()(x), old(x))
    if kind == "bsconv_s":  # pw1 comes out with orthonormal rows
        w = new.pw1.weight[:, :, 0, 0]
        torch.testing.assert_close(w @ w.t(), torch.eye(4, dtype=torch.float64))


def test_transfer_on_full_rank_weights_is_only_an_initialisation():
    old = nn.Conv2d(8, 12, 3, padding=1)
    _, report = convert(old, "bsconv_u", transfer_weights=True, return_report=True)
    assert 0 < report.replaced[0].transfer_error < 1
    _, fresh = convert(old, "bsconv_u", return_report=True)
    assert fresh.replaced[0].transfer_error is None


# ----------------------------------------------------------------- bad input
def test_bad_input_clear_errors():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3))
    with pytest.raises(ValueError, match="kind must be one of"):
        convert(model, "hetconv2")
    with pytest.raises(ValueError, match="do not apply to conv kind 'dsc'"):
        convert(model, "dsc", p=4)
    with pytest.raises(ValueError, match="needs the option p"):
        convert(model, "hetconv")
    with pytest.raises(ValueError, match="p=7 divides the channels of none"):
        convert(model, "hetconv", p=7)
    with pytest.raises(ValueError, match="groups=5 divides the channels of none"):
        convert(model, "gwpw", groups=5)
    with pytest.raises(ValueError, match="p_policy"):
        convert(model, "hetconv", p=4, p_policy="nearest")
    with pytest.raises(TypeError, match="nn.Module"):
        convert("vgg16", "hetconv", p=4)
    with pytest.raises(ValueError, match="shape pass"):
        convert(model, "dsc", input_size=(5, 8, 8))


def test_standard_kind_replaces_nothing():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3))
    converted, report = convert(model, "standard", return_report=True)
    assert not report.replaced and "already a standard" in skipped_reasons(report)["1"]
    assert type(converted[1]) is nn.Conv2d


# --------------------------------------------------- official bsconv ResNet-20
bsconv_official = optional_module("bsconv.pytorch")
requires_bsconv = requires(bsconv_official, reason="the official bsconv package is not installed (the test extra has it)")


@pytest.mark.parametrize("variant,kind,options", [
    ("cifar_resnet20_bsconvu", "bsconv_u", dict(with_bn=False)),
    ("cifar_resnet20_bsconvs_p1d4", "bsconv_s", dict(p=0.25, with_bn=True)),
])
@requires_bsconv
def test_official_bsconv_resnet20_parameter_count_and_weights(variant, kind, options):
    """The official package replaces every groups=1 3x3/5x5 conv, the stem
    included (BSConv-U without BN, BSConv-S with BN, p=1/4): so does
    leanconv.convert with skip_stem=False; the official checkpoint then loads
    strictly and computes the same outputs."""
    torch.manual_seed(0)
    standard = bsconv_official.get_model("cifar_resnet20", num_classes=10)
    official = bsconv_official.get_model(variant, num_classes=10).eval()
    converted = convert(standard, kind, skip_stem=False, **options).eval()
    assert n_params(converted) == n_params(official)
    assert n_params(standard) == 272_480
    assert n_params(official) == {"bsconv_u": 40_720, "bsconv_s": 27_255}[kind]
    converted.load_state_dict(official.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_matches_reference(converted(x), official(x))


# ----------------------------------------------------------------- third party
def test_torchvision_resnet18_if_available():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    converted, report = convert(model, "hetconv", p=4, return_report=True)
    assert "stem" in skipped_reasons(report)["conv1"] or "p=4" in skipped_reasons(report)["conv1"]
    assert any(isinstance(m, HetConv2d) for m in converted.modules())
    assert converted(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_timm_model_if_available():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    converted = convert(model, "dsc")
    assert converted(torch.randn(1, 3, 64, 64)).shape == (1, 10)


# ---------------------------------------------------------------------- zoo
def zoo():
    models = pytest.importorskip("leanconv.models")
    if not hasattr(models, "create"):
        pytest.skip("leanconv.models.create is not available yet")
    return models


@pytest.mark.parametrize("kind,options", [
    ("hetconv", dict(p=4)), ("dsc", {}), ("bsconv_u", {}), ("bsconv_s", dict(with_bn=True)), ("gwpw", dict(g=4)),
])
def test_zoo_vgg16_cifar_converts(kind, options):
    models = zoo()
    model = models.create("vgg16_cifar", width=0.25, num_classes=10)
    converted, report = convert(model, kind, input_size=(3, 32, 32), return_report=True, **options)
    assert len(report.replaced) == 12  # 13 convs, the stem stays standard
    assert converted(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert report.params_after < report.params_before


def test_zoo_hetconv_matches_zoo_built_hetconv():
    models = zoo()
    converted = convert(models.create("vgg16_cifar", width=0.5), "hetconv", p=4)
    built = models.create("vgg16_cifar", conv="hetconv", p=4, width=0.5)
    assert n_params(converted) == n_params(built)


@pytest.mark.parametrize("name", ["resnet20_cifar", "mobilenet_v2_cifar"])
def test_zoo_other_models_convert(name):
    models = zoo()
    if name not in models.names():
        pytest.skip(f"{name} is not in the zoo yet")
    model = models.create(name, num_classes=10)
    converted = convert(model, "hetconv", p=4, p_policy="largest")
    assert converted.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


# ---------------------------------------------------------------------- CLI
@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_models.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        def small():
            return nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
            )
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_models:small"
    sys.modules.pop("user_models", None)


def test_cli_convert_prints_report_and_saves_checkpoint(user_module, tmp_path, capsys):
    from leanconv.cli import main

    out = tmp_path / "ckpt" / "small.pt"
    code = main(["convert", user_module, "--conv", "hetconv", "--p", "4", "--input-size", "3,16,16", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "replaced (1)" in text and "HetConv2d(p=4)" in text and "MACs" in text
    model = load_converted(out)
    assert isinstance(model[3], HetConv2d) and model[3].p == 4
    saved = torch.load(out, weights_only=True)
    model.eval()
    reference = load_converted(out).eval()
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(model(x), reference(x))
    assert saved["kind"] == "hetconv" and saved["source"] == {"callable": user_module}
    assert not list(out.parent.glob(".tmp-*"))  # written atomically


def test_cli_convert_json_and_errors(user_module, capsys):
    from leanconv.cli import main

    assert main(["convert", user_module, "--conv", "bsconv_s", "--with-bn", "--p", "0.5", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "bsconv_s" and len(data["replaced"]) == 1
    assert main(["convert", user_module, "--conv", "dsc", "--p", "4"]) == 2
    assert "do not apply" in capsys.readouterr().err
    assert main(["convert", user_module, "--conv", "hetconv", "--p", "7"]) == 2
    assert "divides the channels of none" in capsys.readouterr().err
    assert main(["convert", "no_such_module_xyz:f", "--conv", "dsc"]) == 2


def test_checkpoint_rebuild_uses_the_same_stem(tmp_path, monkeypatch):
    """A model whose first-registered conv is not the first to run: the CLI's
    shape pass picks the executed stem, and load_converted must rebuild alike."""
    (tmp_path / "late_stem_models.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        class LateStem(nn.Module):
            def __init__(self):
                super().__init__()
                self.later = nn.Conv2d(8, 8, 3, padding=1)
                self.first = nn.Conv2d(3, 8, 3, padding=1)

            def forward(self, x):
                return self.later(self.first(x))

        def build():
            return LateStem()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    from leanconv.cli import main

    out = tmp_path / "late.pt"
    try:
        assert main(["convert", "late_stem_models:build", "--conv", "dsc", "--input-size", "3,8,8", "--out", str(out)]) == 0
        model = load_converted(out)
        assert isinstance(model.later, DSConv2d) and type(model.first) is nn.Conv2d
    finally:
        sys.modules.pop("late_stem_models", None)


# ------------------------------------------------------- never costlier by default
def test_costlier_replacements_are_skipped_with_both_figures():
    """GWC+PWC on a dense-block-style conv with few outputs costs more than the
    conv (M(M/G K^2 + N) > M N K^2 when N is small against M); HetConv with p=1
    costs the same: both are left alone unless allow_costlier=True."""
    model = nn.Sequential(nn.Conv2d(3, 128, 3, padding=1), nn.Conv2d(128, 8, 3, padding=1),
                          nn.Conv2d(8, 64, 3, padding=1))
    converted, report = convert(model, "gwpw", g=4, input_size=(3, 8, 8), return_report=True)
    reason = skipped_reasons(report)["1"]
    assert "not cheaper" in reason and "37,888 MACs per output pixel (was 9,216)" in reason
    assert type(converted[1]) is nn.Conv2d and [r.name for r in report.replaced] == ["2"]
    assert report.model_macs_after < report.model_macs_before
    forced, forced_report = convert(model, "gwpw", g=4, allow_costlier=True, return_report=True)
    assert isinstance(forced[1], GWPWConv2d) and "costlier" in forced_report.replaced[0].note
    _, same = convert(model, "hetconv", p=1, return_report=True)
    assert not same.replaced and all("not cheaper" in r for n, r in skipped_reasons(same).items() if n != "0")
    assert len(convert(model, "hetconv", p=1, allow_costlier=True, return_report=True)[1].replaced) == 2


def test_report_totals_agree_with_leanconv_profile(user_module, capsys):
    from leanconv.cli import main

    model = __import__("user_models").small()
    _, report = convert(model, "hetconv:p=4", input_size=(3, 16, 16), return_report=True)
    assert main(["profile", user_module, "--conv", "hetconv:p=4", "--input-size", "3,16,16", "--json"]) == 0
    profiled = json.loads(capsys.readouterr().out)
    assert profiled["baseline"]["macs_exact"] == report.model_macs_before
    assert profiled["rows"][0]["macs_exact"] == report.model_macs_after
    assert profiled["rows"][0]["params"] == report.params_after
    saved = report.replaced_macs_before - report.replaced_macs_after
    assert report.model_macs_before - report.model_macs_after == saved


def test_spec_and_keywords():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3))
    converted = convert(model, "hetconv:p=4,layout=shifted")
    assert converted[1].p == 4 and converted[1].layout == "shifted"
    assert convert(model, "hetconv:p=4", layout="shifted")[1].layout == "shifted"
    assert convert(model, "hetconv:p=4", p=4)[1].p == 4  # the same value twice is fine
    with pytest.raises(ValueError, match="p=2 contradicts the conv spec 'hetconv:p=4'"):
        convert(model, "hetconv:p=4", p=2)
    with pytest.raises(ValueError, match="groups=2 contradicts the conv spec 'gwpw:g=4'"):
        convert(model, "gwpw:g=4", groups=2)
    assert isinstance(leanconv.make_conv("hetconv:p=2,layout=shifted", 8, 8, 3), HetConv2d)
    assert leanconv.models.create("resnet20_cifar", conv="hetconv:p=4", width=0.25).zoo_config["p"] == 4


def test_cli_convert_of_a_zoo_model_reloads(tmp_path):
    """A zoo source rebuilds through leanconv.models (this import was broken once)."""
    from leanconv.cli import main

    out = tmp_path / "vgg.pt"
    assert main(["convert", "vgg16_cifar", "--width", "0.125", "--conv", "dsc", "--transfer-weights",
                 "--out", str(out)]) == 0
    model = load_converted(out)
    assert sum(isinstance(m, DSConv2d) for m in model.modules()) == 12
