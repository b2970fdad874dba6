"""``leanconv profile``: the default per-layer table, the paper's P sweep in
both conventions, side-by-side kinds, module:function models, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from leanconv.cli import main


def run_json(capsys, *argv) -> dict:
    assert main(["profile", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_default_is_vgg16_hetconv_p4_per_layer(capsys):
    assert main(["profile"]) == 0
    out = capsys.readouterr().out
    assert "vgg16_cifar" in out and "hetconv:p=4" in out and "FLOPs = 2 x MACs" in out
    assert out.count("HetConv2d") == 12 and "features.0    Conv2d" in out  # stem stays standard
    assert "105,845,760" in out  # exact MACs per image


def test_sweep_p_in_both_conventions_is_consistent(capsys):
    result = run_json(capsys, "vgg16_cifar", "--conv", "hetconv", "--sweep-p", "1,2,4,64", "--convention", "both")
    rows = {row["conv"]: row for row in result["rows"]}
    assert list(rows) == ["hetconv:p=1", "hetconv:p=2", "hetconv:p=4", "hetconv:p=64"]
    p1 = rows["hetconv:p=1"]
    assert p1["macs_paper"] == result["baseline"]["macs_paper"] == 313_740_288
    assert p1["macs_reduction_exact"] == p1["params_reduction"] == 1.0
    for row in rows.values():
        assert row["macs_paper"] > row["macs_exact"]  # bias adds
        assert row["macs_reduction_exact"] == pytest.approx(result["baseline"]["macs_exact"] / row["macs_exact"])
    assert round(rows["hetconv:p=4"]["macs_paper"] / 1e6, 2) == 105.98
    assert "layers" not in p1  # per-layer rows only when asked (or one variant)


def test_kinds_side_by_side_with_per_layer_rows(capsys):
    result = run_json(capsys, "resnet20_cifar", "--conv", "standard,hetconv:p=2,layout=shifted,dsc,bsconv_s,gwpw:g=4",
                      "--width", "0.5", "--per-layer")
    convs = [row["conv"] for row in result["rows"]]
    assert convs == ["standard", "hetconv:p=2,layout=shifted", "dsc", "bsconv_s", "gwpw:g=4"]
    for row in result["rows"]:
        assert sum(layer["macs"] for layer in row["layers"]["exact"]) == row["macs_exact"]
    assert result["rows"][0]["macs_exact"] == result["baseline"]["macs_exact"]
    assert all(row["macs_exact"] < result["baseline"]["macs_exact"] for row in result["rows"][1:])


def test_module_function_model_is_converted(tmp_path, monkeypatch, capsys):
    (tmp_path / "user_profile_models.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        def net():
            return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    result = run_json(capsys, "user_profile_models:net", "--conv", "hetconv:p=4", "--input-size", "3,8,8")
    (row,) = result["rows"]
    # The stem stays standard; the second conv becomes HetConv P=4: 8*8*32*(4*9 + 12) MACs.
    assert row["macs_exact"] == 8 * 8 * 16 * 27 + 8 * 8 * 32 * (4 * 9 + 12) + 32 * 5
    sys.modules.pop("user_profile_models", None)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["no_such_model"], "unknown model 'no_such_model'"),
        (["--conv", "hetconv"], "needs the option p"),
        (["--conv", "dsc", "--sweep-p", "2,4"], "--conv must be hetconv"),
        (["--conv", "hetconv:p=4", "--sweep-p", "2,4"], "must not set it too"),
        (["--conv", "dsc:p=4"], "does not apply to 'dsc'"),
        (["--conv", "hetconv:p=0"], "p must be a positive int"),
        (["user_profile_models_missing:net"], "cannot import module"),
    ],
)
def test_bad_input_is_one_clear_line(argv, match, capsys):
    assert main(["profile", *argv]) == 2
    err = capsys.readouterr().err
    assert "leanconv profile: error:" in err and match in err and "Traceback" not in err


@pytest.mark.slow
def test_console_script_runs_from_a_fresh_process():
    out = subprocess.run([sys.executable, "-m", "leanconv.cli", "profile", "resnet20_cifar", "--conv", "dsc"],
                         capture_output=True, text=True, check=True).stdout
    assert "resnet20_cifar" in out and "dsc" in out
