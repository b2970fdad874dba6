"""The command line as a whole: --help shows the defaults the commands run
with, unreadable checkpoints give one line, a closed pipe ends quietly, and
every command takes the same conv spec."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest
import torch

from leanconv.cli import build_parser, main
from leanconv.commands.compare import DEFAULTS as COMPARE_DEFAULTS
from leanconv.commands.reproduce import EXPERIMENTS
from leanconv.commands.train import shown_default
from leanconv.train import TrainConfig


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    (choices,) = [a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return choices[name]


def _help_defaults(name: str) -> dict[str, str]:
    """{field: the default its --help text states} for every recipe flag."""
    shown = {}
    for action in _subparser(name)._actions:
        found = re.search(r"\(default ([^)]*)\)$", action.help or "")
        if found and action.option_strings and action.dest in TrainConfig.field_names():
            shown[action.dest] = found.group(1)
    return shown


@pytest.mark.parametrize("command,defaults", [
    ("train", {}), ("compare", COMPARE_DEFAULTS), ("reproduce", EXPERIMENTS["hetconv-vgg16-cifar10"]["recipe"]),
])
def test_help_defaults_are_the_defaults_the_command_runs_with(command, defaults):
    shown = _help_defaults(command)
    ran = TrainConfig.resolve(None, {}, defaults=defaults).to_dict()  # what a run without flags resolves to
    assert {"epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule"} <= set(shown)
    rules = {"lr": "0.1 x batch-size / 128", "warmup": "min(1, epochs / 10)"}  # what None resolves to
    for field, text in shown.items():
        expected = rules[field] if ran[field] is None and field in rules else shown_default(ran[field])
        assert text == expected, (command, field, text, ran[field])
    if command == "compare":
        assert (shown["epochs"], shown["batch_size"], shown["lr"]) == ("20", "64", "0.05")
    if command == "reproduce":
        assert shown["epochs"] == "200"


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    good = folder / "good.pt"
    torch.save({"model": {}}, good)
    data = good.read_bytes()
    files = {"garbage": b"this is not a checkpoint", "truncated": data[: len(data) // 2], "empty": b""}
    paths = {}
    for name, content in files.items():
        paths[name] = folder / f"{name}.pt"
        paths[name].write_bytes(content)
    paths["foreign"] = folder / "foreign.pt"
    torch.save({"model": argparse.Namespace(a=1)}, paths["foreign"])  # an object, not plain data
    paths["other_format"] = good
    return paths


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty", "foreign", "other_format"])
@pytest.mark.parametrize("command", [["evaluate", "--checkpoint"], ["export", "--onnx", "x.onnx", "--checkpoint"]],
                         ids=["evaluate", "export"])
def test_unreadable_checkpoints_give_one_line(bad_files, kind, command, capsys):
    path = str(bad_files[kind])
    assert main([*command, path]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and path in lines[0] and "Traceback" not in captured.err, captured.err
    assert "weights_only=False" not in captured.err and "set to `False`" not in captured.err


@pytest.mark.slow
def test_broken_pipe_ends_quietly():
    process = subprocess.Popen([sys.executable, "-m", "leanconv.cli", "profile", "resnet20_cifar", "--per-layer"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    process.stdout.close()  # the reader is gone before the first line (as `| head -0` would)
    stderr = process.stderr.read().decode()
    assert process.wait() == 0 and stderr == "", stderr


def test_every_command_takes_a_conv_spec(tmp_path, capsys):
    assert main(["convert", "resnet20_cifar", "--width", "0.25", "--conv", "hetconv:p=4,layout=shifted"]) == 0
    assert "HetConv2d(p=4, layout=shifted)" in capsys.readouterr().out
    assert main(["profile", "resnet20_cifar", "--width", "0.25", "--conv", "hetconv:p=4,layout=shifted"]) == 0
    capsys.readouterr()
    out = tmp_path / "m.pt"
    assert main(["export", "resnet20_cifar", "--width", "0.25", "--conv", "gwpw:g=2", "--torch-export", str(out)]) == 0
    assert out.exists()
    # keyword flags join the spec; a contradiction is an error naming both
    assert main(["convert", "resnet20_cifar", "--width", "0.25", "--conv", "hetconv:p=4", "--layout", "shifted"]) == 0
    capsys.readouterr()
    assert main(["convert", "resnet20_cifar", "--conv", "hetconv:p=4", "--p", "2"]) == 2
    assert "p=2 contradicts the conv spec 'hetconv:p=4'" in capsys.readouterr().err
    assert main(["train", "--conv", "hetconv:p=4", "--p", "2", "--epochs", "1", "--out", str(tmp_path / "t")]) == 2
    assert "contradicts" in capsys.readouterr().err


def test_convert_allow_costlier_flag(capsys):
    assert main(["convert", "resnet20_cifar", "--width", "0.25", "--conv", "hetconv:p=1"]) == 0
    assert "replaced: none" in capsys.readouterr().out
    assert main(["convert", "resnet20_cifar", "--width", "0.25", "--conv", "hetconv:p=1", "--allow-costlier"]) == 0
    assert "replaced (18)" in capsys.readouterr().out
