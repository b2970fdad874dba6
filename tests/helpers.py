"""Test helpers: the tolerance policy of ../shared/STYLE.md (habit 8), and
running the CLI in a process that gets killed.

* reference-precision paths: within 1e-5 in float32 (scaled by the output's
  magnitude), gradcheck in float64;
* low-precision fast paths: max|fast - ref64| <= 2 * max|torch_lowp - ref64| + atol(dtype).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def assert_matches_reference(fast: torch.Tensor, reference: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-5, what: str = "output"):
    """Reference-precision paths: float32 within 1e-5 (relative to scale), float64 tighter."""
    assert fast.shape == reference.shape, f"{what}: shape {tuple(fast.shape)} != {tuple(reference.shape)}"
    assert torch.isfinite(fast).all() or not torch.isfinite(reference).all(), f"{what}: non-finite values"
    scale = max(1.0, reference.abs().max().item()) if reference.numel() else 1.0
    worst = (fast - reference).abs().max().item() if reference.numel() else 0.0
    assert worst <= atol * scale + rtol * scale, f"{what}: max |fast - ref| = {worst:.3g} (scale {scale:.3g})"


def assert_lowp_policy(fast: torch.Tensor, torch_lowp: torch.Tensor, ref64: torch.Tensor, *, what: str = "output"):
    """Low-precision rule: max|fast - ref64| <= 2 * max|torch_lowp - ref64| + atol(dtype)."""
    atol = ATOL[fast.dtype]
    fast_err = (fast.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    base_err = (torch_lowp.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    assert fast_err <= 2 * base_err + atol, (
        f"{what}: {fast.dtype} error {fast_err:.3g} > 2 x torch's {base_err:.3g} + {atol:g}"
    )


def cuda_available() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def optional_module(name: str):
    """The module ``name``, or None where it is not installed (tests that need it are then
    skipped one by one with :func:`requires`, the rest of their file runs)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def requires(*modules, reason: str):
    """Skip a test (with ``reason``) where any of ``modules`` (from :func:`optional_module`) is None."""
    return pytest.mark.skipif(any(m is None for m in modules), reason=reason)


def run_gpu_benchmark_smoke(script: str, out_dir, *args: str) -> dict:
    """Run ``benchmarks/<script> --smoke`` on the CPU interpreter (TRITON_INTERPRET=1),
    assert it succeeded and return its JSON result (header, correct, rows)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", script), "--smoke", "--out", str(out_dir), *args],
        capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (written,) = [name for name in os.listdir(out_dir) if name.endswith(".json")]
    with open(os.path.join(out_dir, written)) as handle:
        return json.load(handle)


# --- the CLI in a child process ---------------------------------------------------------------------------
def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "leanconv.cli", *args]


def cli_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def start_and_kill(args: list[str], out: str, after_epoch: int) -> int:
    """Start ``leanconv ARGS`` (a training command: train or distill), SIGKILL it
    soon after its checkpoint passes ``after_epoch``; return the epoch of the
    checkpoint it left."""
    from leanconv.train import load_checkpoint

    checkpoint = os.path.join(out, "last.pt")
    process = subprocess.Popen(cli_command(*args), env=cli_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    seen_mtime = os.path.getmtime(checkpoint) if os.path.exists(checkpoint) else None
    while time.time() < deadline and process.poll() is None:
        if os.path.exists(checkpoint) and os.path.getmtime(checkpoint) != seen_mtime:
            seen_mtime = os.path.getmtime(checkpoint)
            if load_checkpoint(checkpoint)["epoch"] > after_epoch:
                break
        time.sleep(0.005)
    time.sleep(0.03)  # into the next epoch's steps
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    return load_checkpoint(checkpoint)["epoch"]
