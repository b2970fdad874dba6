"""leanconv.train and the train/evaluate commands: recipe loading, schedules,
checkpoints, exact resume after SIGKILL (a real killed process), DDP with two
gloo processes on 127.0.0.1, the BSConv-S penalty, AMP and channels-last."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from helpers import cli_command, cli_env, start_and_kill
from leanconv.cli import main
from leanconv.train import LRSchedule, TrainConfig, load_checkpoint, train

MODEL = ["--model", "vgg16_cifar", "--width", "0.125"]

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # training runs


def _weights(path: str) -> dict:
    return load_checkpoint(path)["model"]


# --- recipe ------------------------------------------------------------------------------------------------


def test_config_file_then_flags(tmp_path):
    toml = tmp_path / "recipe.toml"
    toml.write_text('model = "vgg16_cifar"\nepochs = 7\nlr = 0.05\nlabel-smoothing = 0.1\n')
    config = TrainConfig.resolve(str(toml), {"epochs": 3})
    assert (config.model, config.epochs, config.lr, config.label_smoothing) == ("vgg16_cifar", 3, 0.05, 0.1)
    (tmp_path / "recipe.json").write_text('{"schedule": "multistep", "milestones": [2]}')
    config = TrainConfig.resolve(str(tmp_path / "recipe.json"), {"epochs": 4}, defaults={"epochs": 9, "lr": 0.2})
    assert (config.schedule, config.milestones, config.epochs, config.lr) == ("multistep", [2], 4, 0.2)
    bad = tmp_path / "bad.toml"
    bad.write_text("epoch = 3\n")
    with pytest.raises(ValueError, match=r"bad.toml: unknown key\(s\) \['epoch'\]"):
        TrainConfig.resolve(str(bad))
    bad.write_text("epochs = [\n")
    with pytest.raises(ValueError, match="bad.toml: cannot parse"):
        TrainConfig.resolve(str(bad))
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainConfig(schedule="linear")
    yaml = pytest.importorskip("yaml")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"epochs": 5, "amp": "bf16"}))
    assert TrainConfig.resolve(str(tmp_path / "recipe.yaml")).amp == "bf16"


def test_schedules():
    cosine = LRSchedule("cosine", steps_per_epoch=10, epochs=5, warmup_epochs=1)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(10) == pytest.approx(1.0) and cosine(50) == pytest.approx(0.0, abs=1e-12)
    step = LRSchedule("multistep", 10, 4, milestones=(2, 3), gamma=0.1)
    assert [step(s) for s in (0, 19, 20, 30)] == pytest.approx([1, 1, 0.1, 0.01])
    one = LRSchedule("onecycle", 10, 10)
    assert one(0) == pytest.approx(1 / 25) and one(30) == pytest.approx(1.0) and one(100) < 1e-4


def test_progress_lines_without_a_terminal(capsys):
    from leanconv.train.progress import Progress

    progress = Progress(4, "epoch 1/2", interval=0.0)
    for step in range(4):
        progress.update(loss=2.5 - step / 10, acc=0.25, img_s=100)
    progress.close()
    lines = capsys.readouterr().err.splitlines()  # captured stderr is no terminal: plain lines, no bar
    assert [line.split()[2] for line in lines] == ["1/4", "2/4", "3/4"]
    assert lines[0].startswith("epoch 1/2 1/4 loss=2.5 acc=0.25 img_s=100 eta=")
    silent = Progress(4, "epoch 1/2", enabled=False, interval=0.0)
    silent.update(loss=1.0)
    assert capsys.readouterr().err == ""


# --- training, checkpoints, resume -------------------------------------------------------------------------


def test_train_writes_run_folder_and_evaluate_agrees(tiny_data, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", *MODEL, "--conv", "hetconv", "--p", "2", "--data", tiny_data, "--epochs", "2",
                 "--batch-size", "16", "--out", out, "--no-progress", "--warmup", "0.5"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "last.pt", "metrics.jsonl", "summary.json"]
    with open(os.path.join(out, "config.json")) as handle:
        config = json.load(handle)
    assert config["model_spec"]["options"]["p"] == 2 and config["epochs"] == 2
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert {"train_loss", "train_acc", "test_top1", "test_top5", "lr", "images_per_second"} <= set(lines[0])
    checkpoint = load_checkpoint(os.path.join(out, "last.pt"))  # weights_only=True inside
    assert {"model", "optimizer", "scheduler", "epoch", "rng", "config", "model_spec", "data"} <= set(checkpoint)
    assert checkpoint["epoch"] == 2 and checkpoint["data"] == {"seed": 0, "next_epoch": 2}
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", os.path.join(out, "last.pt"), "--data", tiny_data, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"top1", "top5", "loss", "n"} and result["n"] == 24
    assert result["top1"] == pytest.approx(lines[-1]["test_top1"]) and 0 <= result["top1"] <= result["top5"] <= 1
    # An existing run is not overwritten without --resume; --resume of a finished run changes nothing.
    assert main(["train", *MODEL, "--conv", "hetconv", "--p", "2", "--data", tiny_data, "--epochs", "2",
                 "--batch-size", "16", "--out", out, "--no-progress"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    before = _weights(os.path.join(out, "last.pt"))
    assert main(["train", *MODEL, "--conv", "hetconv", "--p", "2", "--data", tiny_data, "--epochs", "2",
                 "--batch-size", "16", "--out", out, "--no-progress", "--warmup", "0.5", "--resume"]) == 0
    after = _weights(os.path.join(out, "last.pt"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_with_more_epochs_extends_the_run(tiny_data, tmp_path, capsys):
    """--resume with a larger --epochs continues from the checkpoint with the
    schedule re-planned for the new length (recorded in config.json and the
    checkpoint); any other recipe change is still refused."""
    out = str(tmp_path / "run")
    args = [*MODEL, "--conv", "hetconv:p=2", "--data", tiny_data, "--batch-size", "16", "--out", out, "--no-progress",
            "--lr", "0.1", "--warmup", "0"]
    assert main(["train", *args, "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main(["train", *args, "--epochs", "1", "--lr", "0.2", "--resume"]) == 2
    assert "another recipe (learning rate: 0.1 -> 0.2)" in capsys.readouterr().err
    # the rate is compared resolved: lr unset resolves by the default rule (0.1 x 16 / 128 here)
    unset = [a for a in args if a not in ("--lr", "0.1")]
    assert main(["train", *unset, "--epochs", "1", "--resume"]) == 2
    assert "learning rate: 0.1 -> 0.0125 (lr unset: this version's default rule)" in capsys.readouterr().err
    assert main(["train", *args, "--epochs", "3", "--resume"]) == 0
    assert "extending" in capsys.readouterr().out
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    checkpoint = load_checkpoint(os.path.join(out, "last.pt"))
    assert checkpoint["epoch"] == 3 and checkpoint["config"]["epochs"] == 3
    assert checkpoint["scheduler"]["lr_lambdas"][0]["epochs"] == 3  # the plan the run now follows
    assert checkpoint["extensions"] == [{"at_epoch": 1, "epochs_before": 1, "epochs_after": 3}]
    with open(os.path.join(out, "config.json")) as handle:
        config = json.load(handle)
    assert config["extensions"] == checkpoint["extensions"] and config["channel_widths"] == [8, 16, 32, 64]
    steps = 80 // 16
    plan = LRSchedule("cosine", steps, 3)
    assert lines[1]["lr"] == pytest.approx(0.1 * plan(2 * steps))  # epoch 2 ends on the 3-epoch plan
    # an extension re-plans the schedule at the recipe's (new) learning rate
    assert main(["train", *[a if a != "0.1" else "0.05" for a in args], "--epochs", "5", "--resume"]) == 0
    assert "re-planned for 5 epochs at base lr 0.05" in capsys.readouterr().out
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert lines[3]["lr"] == pytest.approx(0.05 * LRSchedule("cosine", steps, 5)(4 * steps))
    # evaluate without --data uses the checkpoint's own data, and says so.
    assert main(["evaluate", "--checkpoint", os.path.join(out, "last.pt"), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n"] == 24 and f"of {tiny_data} (the checkpoint's training data" in captured.err


def test_sigkill_and_resume_match_an_uninterrupted_run(tiny_data, tmp_path):
    args = [*MODEL, "--conv", "standard", "--data", tiny_data, "--epochs", "8", "--batch-size", "16",
            "--no-progress", "--warmup", "1", "--schedule", "cosine"]
    reference = str(tmp_path / "reference")
    subprocess.run(cli_command("train", *args, "--out", reference), check=True, env=cli_env(), capture_output=True)

    # Killed twice (the second time while resuming), then resumed to the end.
    killed = str(tmp_path / "killed")
    first = start_and_kill(["train", *args, "--out", killed], killed, after_epoch=0)
    second = start_and_kill(["train", *args, "--out", killed, "--resume"], killed, after_epoch=first)
    assert 1 <= first < second < 8, (first, second)
    subprocess.run(cli_command("train", *args, "--out", killed, "--resume"), check=True, env=cli_env(), capture_output=True)

    expected, resumed = _weights(os.path.join(reference, "last.pt")), _weights(os.path.join(killed, "last.pt"))
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    lines = [json.loads(line) for line in open(os.path.join(killed, "metrics.jsonl"))]
    assert [line["epoch"] for line in lines] == list(range(1, 9))
    reference_lines = [json.loads(line) for line in open(os.path.join(reference, "metrics.jsonl"))]
    assert [line["train_loss"] for line in lines] == pytest.approx([line["train_loss"] for line in reference_lines])
    with open(os.path.join(killed, "summary.json")) as handle:
        assert json.load(handle)["resumed_from_epoch"] == second


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_processes_gloo(tiny_data, tmp_path):
    out = str(tmp_path / "ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "leanconv.cli", "train",
               *MODEL, "--conv", "hetconv:p=2", "--data", tiny_data, "--epochs", "2", "--batch-size", "16",
               "--out", out, "--no-progress", "--device", "cpu"]
    result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("final test:") == 1  # rank 0 alone reports and writes
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [line["epoch"] for line in lines] == [1, 2]
    with open(os.path.join(out, "config.json")) as handle:
        assert json.load(handle)["world_size"] == 2
    with open(os.path.join(out, "summary.json")) as handle:
        summary = json.load(handle)
    # The sharded, all-reduced test evaluation equals one process evaluating everything.
    assert summary["final"]["n"] == 24
    from leanconv.data import BatchLoader, load_dataset
    from leanconv.train import evaluate, load_trained_model

    model, _ = load_trained_model(os.path.join(out, "last.pt"))
    single = evaluate(model, BatchLoader(load_dataset(tiny_data, "test"), 7))
    assert single["top1"] == pytest.approx(summary["final"]["top1"])
    assert single["loss"] == pytest.approx(summary["final"]["loss"], rel=1e-5)


def test_bsconv_s_penalty_bf16_and_channels_last(tiny_data, tmp_path):
    def run(name, **overrides):
        config = TrainConfig(model="vgg16_cifar", width=0.125, conv="bsconv_s", data=tiny_data, epochs=1,
                             batch_size=16, out=str(tmp_path / name), progress=False, **overrides)
        train(config, log=lambda _: None)
        return _weights(os.path.join(config.out, "last.pt"))

    with_penalty, without = run("alpha", ortho_alpha=0.5), run("none", ortho_alpha=0.0)
    pw1 = [k for k in with_penalty if k.endswith("pw1.weight")]
    assert pw1 and any(not torch.equal(with_penalty[k], without[k]) for k in pw1)
    low_precision = run("bf16", amp="bf16", channels_last=True, workers=1)
    assert all(torch.isfinite(v.float()).all() for v in low_precision.values())


def test_training_measures_backends_only_on_request(tiny_data, tmp_path):
    """Measuring would make two runs differ: training uses the deterministic rule
    unless hetconv_autotune turns measuring on (for the run only; no environment writes)."""
    from leanconv import config as leanconv_config
    from leanconv.ops import measure

    measure.clear_cache()
    def leanconv_variables():
        return {k: v for k, v in os.environ.items() if k.startswith("LEANCONV_")}

    environment = leanconv_variables()  # (torch itself may set variables of its own, e.g. Inductor's cache)

    def run(name, **overrides):
        config = TrainConfig(model="vgg16_cifar", width=0.125, conv="hetconv:p=2", data=tiny_data, epochs=1,
                             batch_size=16, out=str(tmp_path / name), progress=False, **overrides)
        train(config, log=lambda _: None)

    run("deterministic")
    assert measure.cache_entries() == {}
    run("timed", hetconv_autotune=True)
    assert measure.cache_entries() and not leanconv_config.benchmark_enabled()
    assert leanconv_variables() == environment
    measure.clear_cache()
