"""What the GPU benchmark scripts share: the timer, the machine's name and commit.

On a CUDA device the timer is ``triton.testing.do_bench`` (CUDA events, median);
in ``--smoke`` runs on the CPU under ``TRITON_INTERPRET=1`` one wall-clock sample
after a warm-up call, only to check that a script still runs end to end.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

CUDA_TIMER = "triton.testing.do_bench median (warmup 25 ms, rep 100 ms)"
SMOKE_TIMER = "wall clock, one call after one warm-up (smoke run: the times mean nothing)"


def make_timer(device: str):
    """ms = timer(fn): the median time of one call of ``fn``."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def wall_clock(fn, rounds: int = 1) -> float:
        fn()
        samples = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    return wall_clock


def machine_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"cpu-interpreter-{platform.machine()}"


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def commit() -> str:
    try:
        return os.environ.get("LEANCONV_COMMIT") or subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def run_header(device: str, **settings) -> dict:
    """The self-description every GPU result file starts with: the machine, torch,
    Triton, CUDA and cuDNN versions, date, commit, timer and command, then ``settings``."""
    import triton

    return {
        "device": machine_name(device), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
        "timer": CUDA_TIMER if device == "cuda" else SMOKE_TIMER,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        **settings,
    }


def pick_device(parser, smoke: bool) -> str:
    """"cuda", or "cpu" for a smoke run (which needs TRITON_INTERPRET=1); else a parser error."""
    if smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--smoke needs TRITON_INTERPRET=1 in the environment (the kernels then run on the CPU)")
        return "cpu"
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1 to check the script on the CPU)")
    return "cuda"
