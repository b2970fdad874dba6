"""Data sets as in-memory uint8 tensors: CIFAR-10/100 from disk or the
embedded default.

``load_dataset(spec, split)`` takes ``"embedded"`` or the path of a CIFAR
python archive / folder. The embedded set ships inside the package
(``leanconv/data/embedded/cifar10_embedded.npz``): real CIFAR-10 images, the
first 100 of each class from the training batches and the first 50 of each
class from the test batch of ``../shared/data/cifar10-subset`` (1,000 + 500
images), so ``--data embedded`` works with no files around. Pixel rows are
stored delta-coded along the width, which zlib packs about 15% tighter. It is
a demo set: accuracies on it are far below full-CIFAR numbers. Rebuilt with
``build_embedded("../shared/data/cifar10-subset")``.

Example::

    data = load_dataset("embedded", "test")
    data.images.shape, data.num_classes      # (500, 3, 32, 32) 10
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..files import write_atomic
from .augment import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from .cifar import CifarFormatError, detect_layout, read_cifar

__all__ = ["Dataset", "EMBEDDED", "EMBEDDED_PATH", "load_dataset", "build_embedded"]

EMBEDDED = "embedded"
EMBEDDED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded", "cifar10_embedded.npz")
_STATS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}


@dataclass
class Dataset:
    """One split in memory: images (N, 3, 32, 32) uint8, labels (N,) int64."""

    name: str  # "cifar10" | "cifar100"
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def mean(self) -> tuple[float, ...]:
        return _STATS[self.name][0]

    @property
    def std(self) -> tuple[float, ...]:
        return _STATS[self.name][1]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _load_embedded(split: str) -> Dataset:
    if not os.path.isfile(EMBEDDED_PATH):
        raise FileNotFoundError(f"the embedded data set is missing from the package: {EMBEDDED_PATH}")
    try:
        with np.load(EMBEDDED_PATH, allow_pickle=False) as archive:
            # Rows are stored delta-coded along the width (uint8, wrapping): undo with one cumsum.
            images = torch.from_numpy(np.cumsum(archive[f"{split}_images"], axis=-1, dtype=np.uint8))
            labels = torch.from_numpy(archive[f"{split}_labels"].astype(np.int64))
            classes = [str(c) for c in archive["classes"]]
    except (OSError, KeyError, ValueError) as error:
        raise CifarFormatError(f"{EMBEDDED_PATH}: unreadable embedded data set ({error})") from error
    return Dataset("cifar10", split, images, labels, classes, EMBEDDED)


def load_dataset(spec: str, split: str = "train") -> Dataset:
    """``spec``: "embedded", or a CIFAR-10/100 python ``.tar.gz`` or folder."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if spec == EMBEDDED:
        return _load_embedded(split)
    path = os.path.expanduser(spec)
    layout, _ = detect_layout(path)
    images, labels, classes = read_cifar(path, split)
    return Dataset(layout.name, split, images, labels, classes, os.path.abspath(path))


def build_embedded(source: str, destination: str = EMBEDDED_PATH, train_per_class: int = 100, test_per_class: int = 50) -> str:
    """Write the embedded set: the first ``train_per_class`` / ``test_per_class``
    images of each class, in file order, from the CIFAR-10 ``source``."""

    def first_per_class(images: torch.Tensor, labels: torch.Tensor, per_class: int) -> tuple[np.ndarray, np.ndarray]:
        keep, counts = [], [0] * 10
        for i, label in enumerate(labels.tolist()):
            if counts[label] < per_class:
                counts[label] += 1
                keep.append(i)
        if min(counts) < per_class:
            raise ValueError(f"{source} has fewer than {per_class} images of some class: {counts}")
        index = torch.tensor(keep)
        return images[index].numpy(), labels[index].numpy().astype(np.uint8)

    train_x, train_y = first_per_class(*read_cifar(source, "train")[:2], train_per_class)
    test_x, test_y = first_per_class(*read_cifar(source, "test")[:2], test_per_class)
    classes = np.array(read_cifar(source, "test")[2])
    delta = lambda x: np.diff(x, axis=-1, prepend=np.zeros_like(x[..., :1]))  # noqa: E731, wraps mod 256
    write_atomic(destination, lambda handle: np.savez_compressed(
        handle, train_images=delta(train_x), train_labels=train_y, test_images=delta(test_x), test_labels=test_y,
        classes=classes))
    return destination

