"""The header every result file carries: machine, torch, threads, load."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch

__all__ = ["describe_environment", "machine_slug"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def describe_environment() -> dict:
    """Machine, software and load at the time of a benchmark run."""
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "hetconv_direct_isa": _direct_isa(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1_5_15min": load,
        "git_commit": _git_commit(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def _direct_isa() -> str | None:
    """The ISA of the direct HetConv kernel this process runs (None where it is unavailable)."""
    from ..ops import hetconv_direct

    return hetconv_direct.active_isa() if hetconv_direct.available() else None


def machine_slug(info: dict | None = None) -> str:
    """A short file-name-safe machine name: cpu model, vector ISA (torch's CPU capability)
    and thread count, e.g. ``amd-epyc-avx512-2t``."""
    info = info or describe_environment()
    words = "".join(c if c.isalnum() else "-" for c in info["cpu"].lower()).split("-")
    stop = {"processor", "cpu", "r", "tm", "with", "radeon", "graphics", ""}
    model = "-".join(w for w in words if w not in stop)[:40].strip("-") or "cpu"
    isa = "".join(c for c in str(info.get("cpu_capability") or "").lower() if c.isalnum())
    return f"{model}-{isa}-{info['torch_threads']}t" if isa else f"{model}-{info['torch_threads']}t"
