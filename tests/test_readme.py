"""Every ```python block of README.md runs as written, in order, in one
namespace (as a reader pasting them into one session would), with sizes
shrunk only where the table below says so."""

from __future__ import annotations

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")

# (text in the README, what the test runs instead): sizes only.
SHRINK: list[tuple[str, str]] = [
    ("torch.randn(8, 64, 32, 32)", "torch.randn(1, 64, 8, 8)"),
]


def python_blocks() -> list[str]:
    with open(README) as handle:
        return re.findall(r"^```python\n(.*?)^```", handle.read(), flags=re.M | re.S)


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 4


def test_every_python_block_runs(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)  # files the examples write land here
    namespace: dict = {}
    for index, block in enumerate(python_blocks()):
        for text, smaller in SHRINK:
            block = block.replace(text, smaller)
        try:
            exec(compile(block, f"README.md python block {index + 1}", "exec"), namespace)
        except Exception as error:  # noqa: BLE001 - name the block that failed
            pytest.fail(f"README python block {index + 1} failed: {type(error).__name__}: {error}\n{block}")
