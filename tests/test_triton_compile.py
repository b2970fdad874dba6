"""The Triton kernels build for a real GPU target (sm_90), not only for the interpreter.

The other kernel tests run under TRITON_INTERPRET=1, which accepts code a GPU
compile may refuse. scripts/compile_kernels.py compiles kernels with Triton's
compiler and bundled ptxas for a CUDA architecture, without a GPU; here one
configuration per kernel and variant in bfloat16 (~40 s; the full list is
`python scripts/compile_kernels.py`).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

HAS_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = [
    pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (pip install 'leanconv[triton]')"),
    pytest.mark.slow,
]


def _bundled_ptxas() -> bool:
    spec = importlib.util.find_spec("triton")
    root = os.path.dirname(spec.origin)
    return os.path.exists(os.path.join(root, "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.skipif(HAS_TRITON and not _bundled_ptxas(), reason="this Triton has no bundled ptxas")
def test_every_kernel_and_variant_compiles_for_sm90(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # A cache of its own: the compile really runs, and nothing is written outside tmp_path.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    result = subprocess.run(
        [sys.executable, os.path.join(root, "scripts", "compile_kernels.py"), "--first", "--dtypes", "bf16"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    built = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert sorted(set(built)) == ["depthwise_dw", "depthwise_dx", "depthwise_fwd", "hetconv_dw", "hetconv_dx",
                                  "hetconv_fwd"]
    assert built.count("hetconv_fwd") == 2 and built.count("hetconv_dw") == 2, "both variants of each"
    assert result.stdout.rstrip().endswith("0 failed")
