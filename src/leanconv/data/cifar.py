"""CIFAR-10 and CIFAR-100 from the official "python version" archives.

Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009,
https://www.cs.toronto.edu/~kriz/cifar.html.

The source is either the ``.tar.gz`` as downloaded or its extracted folder
(``cifar-10-batches-py`` / ``cifar-100-python``, or a folder holding one of
them). Files are read straight from the archive, without extracting it, and a
split reads only its own files: CIFAR-10 ``test`` needs only ``test_batch``
and ``batches.meta``; ``train`` needs ``data_batch_1`` .. ``data_batch_5``
and ``batches.meta``. CIFAR-100 has one ``train``, one ``test`` and ``meta``.

Every file is checked: present, a complete pickle, a dict with the right keys,
``data`` of shape (N, 3072) with byte values, as many labels as images, labels
inside the class range. A bad file raises :class:`CifarFormatError` (a
ValueError) or FileNotFoundError whose message names the file.

Example::

    images, labels, classes = read_cifar("cifar-10-python.tar.gz", "test")
    images.shape, images.dtype      # (10000, 3, 32, 32) torch.uint8
"""

from __future__ import annotations

import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

__all__ = ["CifarFormatError", "CifarLayout", "LAYOUTS", "detect_layout", "read_cifar"]

IMAGE_BYTES = 3 * 32 * 32


class CifarFormatError(ValueError):
    """A CIFAR file is missing pieces, truncated, or holds the wrong contents."""


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps each split, and under which keys."""

    name: str  # "cifar10" | "cifar100"
    folder: str  # folder inside the archive
    splits: dict  # split -> tuple of batch file names
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int


LAYOUTS = {
    "cifar10": CifarLayout(
        "cifar10", "cifar-10-batches-py",
        {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        "batches.meta", b"labels", b"label_names", 10,
    ),
    "cifar100": CifarLayout(
        "cifar100", "cifar-100-python", {"train": ("train",), "test": ("test",)},
        "meta", b"fine_labels", b"fine_label_names", 100,
    ),
}


class _Source:
    """Read named files from a folder or from a .tar.gz, by base name."""

    def __init__(self, path: str):
        self.path = path
        self._tar = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if os.path.isdir(path):
            self.kind = "folder"
        elif os.path.isfile(path):
            self.kind = "archive"
            try:
                self._tar = tarfile.open(path, "r:*")
                for member in self._tar.getmembers():
                    if member.isfile():
                        self._members.setdefault(member.name.rstrip("/"), member)
            except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
                raise CifarFormatError(f"{path}: not a readable tar archive ({error})") from error
        else:
            raise FileNotFoundError(f"CIFAR data not found: {path} is neither a folder nor an archive")

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()

    def has_folder_with(self, folder: str, file_name: str) -> str | None:
        """The prefix under which ``folder/file_name`` (or ``file_name``) exists, else None."""
        if self.kind == "folder":
            for prefix in (os.path.join(self.path, folder), self.path):
                if os.path.isfile(os.path.join(prefix, file_name)):
                    return prefix
            return None
        for name in self._members:
            if os.path.basename(name) == file_name and os.path.basename(os.path.dirname(name)) in (folder, ""):
                return os.path.dirname(name)
        return None

    def describe(self, prefix: str, file_name: str) -> str:
        if self.kind == "folder":
            return os.path.join(prefix, file_name)
        return f"{self.path}:{prefix + '/' if prefix else ''}{file_name}"

    def read(self, prefix: str, file_name: str) -> bytes:
        where = self.describe(prefix, file_name)
        if self.kind == "folder":
            full = os.path.join(prefix, file_name)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"missing CIFAR file {full}")
            with open(full, "rb") as handle:
                return handle.read()
        member = self._members.get(f"{prefix}/{file_name}" if prefix else file_name)
        if member is None:
            raise FileNotFoundError(f"missing CIFAR file {where}")
        try:
            return self._tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
            raise CifarFormatError(f"{where}: archive member unreadable, truncated or corrupt ({error})") from error


def detect_layout(source: str | _Source) -> tuple[CifarLayout, str]:
    """Which CIFAR variant ``source`` holds and the folder prefix of its files."""
    owned = not isinstance(source, _Source)
    src = _Source(source) if owned else source
    try:
        for layout in LAYOUTS.values():
            prefix = src.has_folder_with(layout.folder, layout.meta_file)
            if prefix is not None:
                return layout, prefix
        expected = " or ".join(f"{l.folder}/{l.meta_file}" for l in LAYOUTS.values())
        raise FileNotFoundError(f"{src.path}: no CIFAR meta file found (expected {expected})")
    finally:
        if owned:
            src.close()


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        content = pickle.loads(raw, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            MemoryError, KeyError) as error:
        raise CifarFormatError(f"{where}: not a complete CIFAR pickle (truncated or corrupt: {error!r})") from error
    if not isinstance(content, dict):
        raise CifarFormatError(f"{where}: expected a pickled dict, found {type(content).__name__}")
    # Python-3 pickles of the same data carry str keys; accept both.
    return {key.encode() if isinstance(key, str) else key: value for key, value in content.items()}


def _read_meta(src: _Source, prefix: str, layout: CifarLayout) -> list[str]:
    where = src.describe(prefix, layout.meta_file)
    meta = _unpickle(src.read(prefix, layout.meta_file), where)
    names = meta.get(layout.names_key)
    if not isinstance(names, (list, tuple)) or len(names) != layout.num_classes:
        found = "missing" if names is None else f"{type(names).__name__} of length {len(names) if hasattr(names, '__len__') else '?'}"
        raise CifarFormatError(f"{where}: key {layout.names_key!r} must list {layout.num_classes} class names, found {found}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _read_batch(src: _Source, prefix: str, file_name: str, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    where = src.describe(prefix, file_name)
    batch = _unpickle(src.read(prefix, file_name), where)
    for key in (b"data", layout.label_key):
        if key not in batch:
            raise CifarFormatError(f"{where}: key {key!r} missing (keys present: {sorted(batch)})")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != IMAGE_BYTES:
        shape = getattr(data, "shape", type(data).__name__)
        raise CifarFormatError(f"{where}: 'data' must be an array of shape (N, {IMAGE_BYTES}), found {shape}")
    if data.dtype != np.uint8:
        raise CifarFormatError(f"{where}: 'data' must hold uint8 pixel values, found dtype {data.dtype}")
    try:
        labels = np.asarray(batch[layout.label_key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as error:
        raise CifarFormatError(f"{where}: labels {layout.label_key!r} are not integers ({error})") from error
    if labels.shape[0] != data.shape[0]:
        raise CifarFormatError(
            f"{where}: {data.shape[0]} images but {labels.shape[0]} labels ({layout.label_key!r}); the counts must match"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise CifarFormatError(
            f"{where}: labels must lie in 0..{layout.num_classes - 1}, found {labels.min()}..{labels.max()}"
        )
    return data, labels


def read_cifar(
    path: str,
    split: str = "train",
    *,
    progress: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images (N, 3, 32, 32) uint8, labels (N,) int64 and class names of one split.

    ``path``: a CIFAR-10/100 python ``.tar.gz`` or its extracted folder.
    ``split``: "train" or "test".
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    src = _Source(path)
    try:
        layout, prefix = detect_layout(src)
        classes = _read_meta(src, prefix, layout)
        parts, part_labels = [], []
        for file_name in layout.splits[split]:
            if progress:
                progress(f"reading {src.describe(prefix, file_name)}")
            data, labels = _read_batch(src, prefix, file_name, layout)
            parts.append(data)
            part_labels.append(labels)
    finally:
        src.close()
    data = np.concatenate(parts) if len(parts) > 1 else parts[0]
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32))
    return images, torch.from_numpy(np.concatenate(part_labels)), classes
