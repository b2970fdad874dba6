"""Files: atomic writes (the one place leanconv writes a file a reader may
see) and safe reads of PyTorch files (``weights_only=True``, one-line errors).

A file is written to a temporary file in the same folder, flushed to disk and
renamed over the target, so a reader (or a run killed half-way) never sees half
a file. The result has the permissions an ordinary ``open(path, "w")`` would
give it (0666 less the process umask, usually 0644), not ``mkstemp``'s 0600.

A PyTorch file is read with ``torch.load(..., weights_only=True)``: only
tensors and plain data, never code. A file that is missing, truncated, corrupt
or holds other objects gives one ValueError naming the file and what is wrong
(never the advice to load it with ``weights_only=False``).

This module imports nothing from leanconv: every layer of the package may use it.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from typing import BinaryIO, Callable

__all__ = ["read_torch_file", "write_atomic"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: str | bytes | Callable[[BinaryIO], None]) -> None:
    """Write ``data`` to ``path`` atomically.

    ``data``: text (written as UTF-8), bytes, or a function that writes to the
    binary file object it is given (e.g. ``lambda f: torch.save(obj, f)``).
    Missing parent folders are created.

    Example::

        write_atomic("out/results.json", json.dumps({"top1": 0.9}))
        write_atomic("out/last.pt", lambda f: torch.save(state, f))
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _why_unreadable(error: Exception) -> str:
    """A short reason for a failed weights-only load, free of torch's advice."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError):
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            return (f"it holds Python objects, not only tensors and plain data ({found.group(1)}); "
                    f"leanconv reads checkpoints as data only")
        return "its contents are not a PyTorch checkpoint (unreadable pickle data)"
    if "zip archive" in text or isinstance(error, EOFError):
        return "truncated or corrupt (not a complete PyTorch zip archive)"
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return first if "weights_only" not in first else type(error).__name__


def read_torch_file(path: str | os.PathLike, what: str = "checkpoint", map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with one-line errors: a
    FileNotFoundError when ``path`` is no file, else a ValueError
    ``"<path>: not a readable <what>: <reason>"``.

    Example::

        state = read_torch_file("runs/train/last.pt")
    """
    import torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated, corrupt and foreign files raise many types
        raise ValueError(f"{path}: not a readable {what}: {_why_unreadable(error)}") from None
