"""Atomic file writes: the one place leanconv writes a file a reader may see.

A file is written to a temporary file in the same folder, flushed to disk and
renamed over the target, so a reader (or a run killed half-way) never sees half
a file. The result has the permissions an ordinary ``open(path, "w")`` would
give it (0666 less the process umask, usually 0644), not ``mkstemp``'s 0600.

This module imports nothing from leanconv: every layer of the package may use it.
"""

from __future__ import annotations

import os
import tempfile
from typing import BinaryIO, Callable

__all__ = ["write_atomic"]


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
