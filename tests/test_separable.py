"""DSConv2d, GWPWConv2d, BSConvU2d, BSConvS2d: parameter counts from the papers,
forward against the explicit composition, compatibility with the official
bsconv package, the orthonormality penalty, and bad input."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import leanconv
from leanconv.layers import bsconv_s_mid_channels, make_conv

from helpers import assert_matches_reference, optional_module, requires

bsconv_pytorch = optional_module("bsconv.pytorch")
requires_bsconv = requires(bsconv_pytorch, reason="the official bsconv package is not installed (the test extra has it)")


def n_params(module: nn.Module) -> int:
    return sum(t.numel() for t in module.parameters())


def test_parameter_counts_from_background():
    # 10 -> 32 channels, K = 3, with biases (BACKGROUND.md).
    assert n_params(nn.Conv2d(10, 32, 3)) == 2912
    assert n_params(leanconv.DSConv2d(10, 32, 3)) == 452
    assert n_params(leanconv.BSConvU2d(10, 32, 3)) == 640
    m, n, k = 64, 128, 3
    mid = bsconv_s_mid_channels(m)
    assert mid == 16
    assert n_params(leanconv.BSConvS2d(m, n, k)) == m * mid + mid * n + n * k * k + n
    assert n_params(leanconv.GWPWConv2d(m, n, k, groups=4)) == m * (m // 4) * k * k + m + m * n + n


@pytest.mark.parametrize("m,p,minimum,expected", [(64, 0.25, 4, 16), (10, 0.25, 4, 4), (3, 0.25, 4, 3), (33, 0.25, 4, 9), (8, 1.0, 4, 8), (8, 0.0, 2, 2)])
def test_bsconv_s_mid_channels_rule(m, p, minimum, expected):
    assert bsconv_s_mid_channels(m, p, minimum) == expected == min(m, max(minimum, math.ceil(p * m)))


@pytest.mark.parametrize("with_bn", [False, True])
@pytest.mark.parametrize("depth_multiplier", [1, 2])
def test_dsconv_is_depthwise_then_pointwise(with_bn, depth_multiplier):
    layer = leanconv.DSConv2d(6, 10, (3, 5), (2, 1), (1, 2), (1, 2), depth_multiplier=depth_multiplier,
                              with_bn=with_bn, dtype=torch.float64).eval()
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64)
    y = F.conv2d(x, layer.dw.weight, layer.dw.bias, (2, 1), (1, 2), (1, 2), groups=6)
    if with_bn:
        assert layer.dw.bias is None
        y = layer.bn(y)
    y = F.conv2d(y, layer.pw.weight, layer.pw.bias)
    assert_matches_reference(layer(x), y, atol=1e-12, rtol=0)
    assert layer.dw.out_channels == 6 * depth_multiplier
    assert_matches_reference(layer(x[0]), layer(x[:1])[0], atol=0, rtol=0)


def test_gwpw_is_groupwise_then_pointwise():
    layer = leanconv.GWPWConv2d(8, 12, 3, padding=1, groups=4, dtype=torch.float64)
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    y = F.conv2d(F.conv2d(x, layer.gw.weight, layer.gw.bias, padding=1, groups=4), layer.pw.weight, layer.pw.bias)
    assert_matches_reference(layer(x), y, atol=1e-12, rtol=0)
    assert layer.gw.groups == 4 and layer.gw.out_channels == 8


@pytest.mark.parametrize("with_bn", [False, True])
@pytest.mark.parametrize("args", [dict(), dict(stride=2, padding=1, dilation=1), dict(padding=2, dilation=2, bias=False, padding_mode="reflect")])
@requires_bsconv
def test_bsconv_u_loads_official_checkpoints(with_bn, args):
    official = bsconv_pytorch.BSConvU(10, 32, 3, with_bn=with_bn, **args).double()
    ours = leanconv.BSConvU2d(10, 32, 3, with_bn=with_bn, dtype=torch.float64, **args)
    assert list(ours.state_dict()) == list(official.state_dict())
    if with_bn:  # non-trivial BN statistics
        official.train()(torch.randn(4, 10, 9, 9, dtype=torch.float64))
    ours.load_state_dict(official.state_dict(), strict=True)
    official.eval(), ours.eval()
    x = torch.randn(2, 10, 9, 9, dtype=torch.float64)
    assert_matches_reference(ours(x), official(x), atol=0, rtol=0)


@pytest.mark.parametrize("with_bn", [False, True])
@pytest.mark.parametrize("p,min_mid", [(0.25, 4), (0.5, 2), (1.0, 4)])
@requires_bsconv
def test_bsconv_s_loads_official_checkpoints(with_bn, p, min_mid):
    official = bsconv_pytorch.BSConvS(24, 16, 5, 2, 2, with_bn=with_bn, p=p, min_mid_channels=min_mid).double()
    ours = leanconv.BSConvS2d(24, 16, 5, 2, 2, with_bn=with_bn, p=p, min_mid_channels=min_mid, dtype=torch.float64)
    assert list(ours.state_dict()) == list(official.state_dict())
    ours.load_state_dict(official.state_dict(), strict=True)
    official.eval(), ours.eval()
    x = torch.randn(2, 24, 10, 10, dtype=torch.float64)
    assert_matches_reference(ours(x), official(x), atol=0, rtol=0)
    assert_matches_reference(ours.orthonormal_penalty(), official._reg_loss().double(), atol=1e-12, rtol=1e-12)


@requires_bsconv
def test_orthonormal_penalty_matches_official_mixin():
    torch.manual_seed(0)

    class OfficialModel(nn.Sequential, bsconv_pytorch.BSConvS_ModelRegLossMixin):
        pass

    official = OfficialModel(
        bsconv_pytorch.BSConvS(16, 32, 3), nn.ReLU(), bsconv_pytorch.BSConvS(32, 8, 3, with_bn=True), nn.Conv2d(8, 8, 1)
    )
    ours = nn.Sequential(leanconv.BSConvS2d(16, 32, 3), nn.ReLU(), leanconv.BSConvS2d(32, 8, 3, with_bn=True),
                         nn.Conv2d(8, 8, 1))
    ours.load_state_dict(official.state_dict())
    for alpha in (0.1, 1.0):
        expected = official.reg_loss(alpha=alpha)
        got = leanconv.orthonormal_penalty(ours, alpha=alpha)
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
    # The official mixin also works on leanconv layers.
    mixed = OfficialModel(*ours)
    assert torch.allclose(mixed.reg_loss(0.1), leanconv.orthonormal_penalty(ours, 0.1), rtol=1e-6)
    # The penalty trains: its gradient reaches pw1 only.
    leanconv.orthonormal_penalty(ours).backward()
    assert ours[0].pw1.weight.grad is not None and ours[0].pw2.weight.grad is None


def test_orthonormal_penalty_is_zero_without_bsconv_s():
    assert leanconv.orthonormal_penalty(nn.Sequential(nn.Conv2d(3, 4, 3))).item() == 0.0
    assert leanconv.orthonormal_penalty(nn.Sequential()).item() == 0.0


def test_orthonormal_penalty_vanishes_for_orthonormal_rows():
    layer = leanconv.BSConvS2d(16, 8, 3, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    with torch.no_grad():
        layer.pw1.weight.copy_(q[: layer.mid_channels, :, None, None])
    assert layer.orthonormal_penalty().item() < 1e-12


@pytest.mark.parametrize("cls", [leanconv.DSConv2d, leanconv.BSConvU2d, leanconv.BSConvS2d])
def test_unbatched_input_and_dtype_threading(cls):
    layer = cls(8, 12, 3, padding=1, with_bn=True, dtype=torch.float64).eval()
    assert {t.dtype for t in layer.parameters()} == {torch.float64}
    x = torch.randn(8, 6, 6, dtype=torch.float64)
    assert_matches_reference(layer(x), layer(x[None])[0], atol=0, rtol=0)


def test_extra_repr():
    assert leanconv.DSConv2d(8, 16).extra_repr() == "8, 16, kernel_size=(3, 3), stride=(1, 1)"
    assert "groups=4" in repr(leanconv.GWPWConv2d(8, 16, groups=4))
    assert "mid_channels=4" in repr(leanconv.BSConvS2d(8, 16))
    assert "with_bn=True" in repr(leanconv.BSConvU2d(8, 16, with_bn=True))


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: leanconv.DSConv2d(0, 8), "in_channels must be a positive int"),
        (lambda: leanconv.DSConv2d(8, 8, depth_multiplier=0), "depth_multiplier"),
        (lambda: leanconv.GWPWConv2d(8, 8, groups=3), "groups must divide in_channels"),
        (lambda: leanconv.BSConvS2d(8, 8, p=1.5), "p must be a number in \\(0, 1\\]"),
        (lambda: leanconv.BSConvU2d(8, 8, padding_mode="mirror"), "padding_mode"),
        (lambda: leanconv.BSConvU2d(8, 8, padding="same", stride=2), "strided"),
    ],
)
def test_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("cls", [leanconv.DSConv2d, leanconv.BSConvU2d, leanconv.BSConvS2d])
def test_wrong_input_channels_named(cls):
    with pytest.raises(ValueError, match="expected input with 8 channels.*got 5"):
        cls(8, 8)(torch.randn(1, 5, 6, 6))


def test_factory_builds_every_kind_and_rejects_foreign_options():
    for kind, options in [("standard", {}), ("hetconv", {"p": 4}), ("dsc", {}), ("bsconv_u", {}), ("bsconv_s", {}),
                          ("gwpw", {"g": 4})]:
        layer = make_conv(kind, 8, 16, 3, padding=1, **options)
        assert layer(torch.randn(1, 8, 5, 5)).shape == (1, 16, 5, 5)
    with pytest.raises(ValueError, match="do not apply to conv kind 'dsc'"):
        make_conv("dsc", 8, 8, 3, p=4)
    with pytest.raises(ValueError, match="kind must be one of"):
        make_conv("hetconv2", 8, 8, 3)
    with pytest.raises(ValueError, match="needs the option p"):
        make_conv("hetconv", 8, 8, 3)


@pytest.mark.slow
def test_torch_compile_handles_every_layer_kind():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        leanconv.HetConv2d(8, 8, 3, padding=1, p=4),
        leanconv.HetConv2d(8, 8, 3, padding=1, p=2, layout="shifted", backend="reference"),
        leanconv.DSConv2d(8, 8, 3, padding=1, with_bn=True),
        leanconv.GWPWConv2d(8, 8, 3, padding=1, groups=2),
        leanconv.BSConvU2d(8, 8, 3, padding=1, with_bn=True),
        leanconv.BSConvS2d(8, 8, 3, padding=1),
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model)
    with torch.no_grad():
        assert_matches_reference(compiled(x), model(x), atol=1e-5, rtol=1e-5)


def test_depthwise_layer_checks_its_input_and_mirrors_nn_conv2d_arguments():
    from leanconv.layers import DepthwiseConv2d

    layer = DepthwiseConv2d(16, 32, 3, 1, 1, 1, 16, False)  # nn.Conv2d's positional order, groups included
    reference = nn.Conv2d(16, 32, 3, 1, 1, 1, 16, False)
    assert layer.groups == 16 and layer.bias is None and layer.weight.shape == reference.weight.shape
    with pytest.raises(ValueError, match="DepthwiseConv2d: expected input with 16 channels"):
        layer(torch.randn(1, 8, 5, 5))
    with pytest.raises(ValueError, match="groups must equal in_channels"):
        DepthwiseConv2d(16, 32, 3, groups=4)
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(2, 16, 5, 5)
    assert_matches_reference(layer(x), reference(x))
    assert layer.last_backend == "torch"  # auto off CUDA


def test_the_library_works_where_triton_cannot_be_imported(tmp_path):
    """In a process where importing Triton fails, nothing lists or imports it, every
    layer runs, and asking for the triton backends says how to install Triton."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent('''
        import importlib.abc, sys
        class NoTriton(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ModuleNotFoundError(name)
        sys.meta_path.insert(0, NoTriton())
        import torch, leanconv
        assert "triton" not in leanconv.backend_names() and leanconv.backend_names("depthwise") == ("auto", "torch")
        model = torch.nn.Sequential(leanconv.DSConv2d(8, 8, 3, padding=1), leanconv.HetConv2d(8, 8, 3, padding=1, p=4),
                                    leanconv.BSConvU2d(8, 8, 3, padding=1), leanconv.BSConvS2d(8, 8, 3, padding=1))
        assert model(torch.randn(2, 8, 6, 6)).shape == (2, 8, 6, 6)
        for build in (lambda: leanconv.HetConv2d(8, 8, 3, p=4, backend="triton"),
                      lambda: leanconv.DSConv2d(8, 8, 3, depthwise_backend="triton")):
            try:
                build()
            except ValueError as error:
                assert "pip install 'leanconv[triton]'" in str(error), error
            else:
                raise AssertionError("backend 'triton' was accepted without Triton")
        assert "triton" not in sys.modules
        print("ok")
    ''')
    env = {k: v for k, v in os.environ.items() if k not in ("LEANCONV_BACKEND", "LEANCONV_DEPTHWISE_BACKEND")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
