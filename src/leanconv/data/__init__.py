"""Data: CIFAR-10/100 from the official python archives (or the embedded
default), batched torch-only augmentation, and a deterministic, shardable
batch loader whose order and augmentation depend only on (seed, epoch)."""

from .augment import (
    CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, normalize, random_crop_flip, resize, sample_crop_flip,
)
from .cifar import CifarFormatError, read_cifar
from .datasets import EMBEDDED, Dataset, build_embedded, load_dataset
from .loader import BatchLoader, EpochPlan, epoch_generator, plan_epoch
from .download import OFFICIAL_ARCHIVES, ChecksumError, download, download_cifar

__all__ = [
    "BatchLoader", "CIFAR100_MEAN", "CIFAR100_STD", "CIFAR10_MEAN", "CIFAR10_STD", "ChecksumError", "CifarFormatError",
    "Dataset", "EMBEDDED", "EpochPlan", "OFFICIAL_ARCHIVES", "build_embedded", "download", "download_cifar", "epoch_generator",
    "load_dataset", "normalize", "plan_epoch", "random_crop_flip", "read_cifar", "resize", "sample_crop_flip",
]
