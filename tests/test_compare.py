"""leanconv compare / reproduce on a tiny setting: every output file, the row
fields, reuse of finished runs, and the reproduce command's short form."""

from __future__ import annotations

import csv
import json
import os
import sys

import pytest

from leanconv.cli import main

TINY = ["--width", "0.125", "--epochs", "1", "--batch-size", "16", "--repeats", "2", "--no-progress"]

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # training runs


@pytest.mark.parametrize("convs, message", [
    ("standard,hetconv", "needs the option p"),
    ("standard,dsc:p=2", "option 'p' does not apply to 'dsc'"),
    ("standard,conv3", "kind must be one of"),
    ("dsc,standard,dsc", "repeat"),
], ids=["hetconv-without-p", "foreign-option", "unknown-kind", "repeated"])
def test_bad_conv_lists_fail_before_training(tiny_data, tmp_path, capsys, convs, message):
    out = str(tmp_path / "cmp")
    assert main(["compare", "--convs", convs, "--data", tiny_data, "--out", out, *TINY]) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(out)


def test_compare_writes_every_output(tiny_data, tmp_path, capsys):
    out = str(tmp_path / "cmp")
    convs = "standard,hetconv:p=2,dsc,bsconv_u,bsconv_s,gwpw:g=2"
    assert main(["compare", "--model", "vgg16_cifar", "--convs", convs, "--data", tiny_data, "--out", out, *TINY]) == 0
    printed = capsys.readouterr().out
    assert "model=vgg16_cifar" in printed and "| hetconv:p=2 |" in printed and "results.json" in printed
    files = set(os.listdir(out))
    assert {"results.json", "results.csv", "results.md", "settings.json", "runs"} <= files
    try:
        import matplotlib  # noqa: F401

        assert {"accuracy_vs_macs.png", "latency_vs_macs.png"} <= files
    except ImportError:
        pass
    assert not [f for f in files if f.startswith(".tmp")]
    with open(os.path.join(out, "results.json")) as handle:
        rows = json.load(handle)
    assert [row["conv"] for row in rows] == convs.split(",")
    for row in rows:
        for key in ("params", "macs", "macs_paper", "top1", "top5", "latency_ms", "latency_optimized_ms",
                    "train_step_ms", "peak_train_mib"):
            assert row[key] is not None and row[key] >= 0, (row["conv"], key)
        assert 0 <= row["top1"] <= row["top5"] <= 1
    by_conv = {row["conv"]: row for row in rows}
    assert by_conv["standard"]["mac_ratio"] == 1.0
    for cheaper in ("hetconv:p=2", "dsc", "bsconv_u", "bsconv_s", "gwpw:g=2"):
        assert by_conv[cheaper]["macs"] < by_conv["standard"]["macs"]
        assert by_conv[cheaper]["params"] < by_conv["standard"]["params"]
    with open(os.path.join(out, "results.csv")) as handle:
        assert [r["conv"] for r in csv.DictReader(handle)] == convs.split(",")
    assert "| conv | params | macs |" in open(os.path.join(out, "results.md")).read()

    # A second run with the same recipe reuses every finished training run.
    assert main(["compare", "--model", "vgg16_cifar", "--convs", "standard,dsc", "--data", tiny_data, "--out", out,
                 *TINY]) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 2


def test_runtime_columns(tiny_data, tmp_path, capsys):
    """--runtimes adds each deployment runtime's latency of the exported graph; an unknown
    runtime is refused by name before any training."""
    out = str(tmp_path / "cmp")
    assert main(["compare", "--convs", "standard,dsc", "--runtimes", "tensorrt", "--data", tiny_data, "--out", out,
                 *TINY]) == 2
    assert "runtimes must be among ('openvino', 'onnxruntime'), got ['tensorrt']" in capsys.readouterr().err
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    assert main(["compare", "--convs", "standard,dsc", "--runtimes", "onnxruntime", "--data", tiny_data, "--out", out,
                 *TINY]) == 0
    assert "| onnxruntime |" in capsys.readouterr().out
    with open(os.path.join(out, "results.json")) as handle:
        rows = json.load(handle)
    assert all(row["latency_onnxruntime_ms"] > 0 for row in rows)
    assert sorted(os.listdir(os.path.join(out, "onnx"))) == ["dsc.onnx", "standard.onnx"]
    with open(os.path.join(out, "results.csv")) as handle:
        assert "latency_onnxruntime_ms" in next(csv.reader(handle))


def test_reproduce_short_form(tiny_data, tmp_path, capsys):
    out = str(tmp_path / "rep")
    assert main(["reproduce", "hetconv-vgg16-cifar10", "--data", tiny_data, "--ps", "1,4", "--out", out, *TINY]) == 0
    printed = capsys.readouterr().out
    assert "model=vgg16_cifar" in printed and "lr=0.1" in printed
    with open(os.path.join(out, "results.json")) as handle:
        assert [row["conv"] for row in json.load(handle)] == ["standard", "hetconv:p=4"]
    with open(os.path.join(out, "settings.json")) as handle:
        recipe = json.load(handle)["recipe"]
    assert (recipe["momentum"], recipe["weight_decay"], recipe["epochs"]) == (0.9, 5e-4, 1)
    assert main(["reproduce", "hetconv-vgg16-cifar10", "--data", tiny_data, "--ps", "3", "--out", out, *TINY]) == 2


def test_plots_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch):
    from leanconv.compare import write_compare_results

    rows = [{"conv": "standard", "params": 10, "macs": 2_000_000, "macs_paper": 2_100_000, "mac_ratio": 1.0,
             "top1": 0.5, "top5": 0.9, "latency_ms": 1.0, "train_step_ms": 3.0, "peak_train_mib": 1.0}]
    settings = {"recipe": {"model": "vgg16_cifar", "width": 0.25, "epochs": 1, "data": "embedded"},
                "latency_batch": 1, "train_step_batch": 8, "device": "cpu"}
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    notes = []
    paths = write_compare_results(str(tmp_path), rows, settings, log=notes.append)
    assert sorted(os.listdir(tmp_path)) == ["results.csv", "results.json", "results.md", "settings.json"]
    assert len(paths) == 4 and notes == ["plots skipped: matplotlib is not installed (pip install 'leanconv[plot]')"]
