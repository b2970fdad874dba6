"""Batched CIFAR augmentation and normalisation with torch only.

The standard CIFAR recipe (He et al., "Deep Residual Learning for Image
Recognition", https://arxiv.org/abs/1512.03385, section 4.2): pad 4 pixels of
zeros on each side, take a random 32x32 crop, flip horizontally with
probability 1/2. Here the whole batch is done at once: one ``F.pad``, then one
``torch.gather`` whose column index already runs backwards for flipped
images, so crop and flip cost one pass over the pixels. Works on uint8 (before
normalisation, so padding is black as in torchvision) or float tensors, on any
device.

Example::

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8)
    y = normalize(random_crop_flip(x, *sample_crop_flip(128, g)), CIFAR10_MEAN, CIFAR10_STD)
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD",
    "sample_crop_flip", "random_crop_flip", "normalize", "resize",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def sample_crop_flip(n: int, generator: torch.Generator | None = None, padding: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop offsets (n, 2) int64 in [0, 2*padding] (row, column) and flips (n,) bool."""
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.randint(0, 2, (n,), generator=generator).bool()
    return offsets, flips


def random_crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Crop (B, C, H, W) ``images`` at ``offsets`` of the zero-padded image and
    mirror those with ``flips``; returns (B, C, H, W), same dtype and device.

    ``offsets[b] = (padding, padding)`` and ``flips[b] = False`` give image b back unchanged.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    if offsets.shape != (b, 2) or flips.shape != (b,):
        raise ValueError(f"need offsets ({b}, 2) and flips ({b},), got {tuple(offsets.shape)} and {tuple(flips.shape)}")
    if b == 0:
        return images.clone()
    padded_width = w + 2 * padding
    padded = F.pad(images, (padding, padding, padding, padding)).flatten(2)  # (B, C, Hp*Wp)
    offsets = offsets.to(images.device)
    rows = offsets[:, :1] + torch.arange(h, device=images.device)  # (B, H)
    cols = offsets[:, 1:] + torch.arange(w, device=images.device)  # (B, W)
    cols = torch.where(flips.to(images.device)[:, None], cols.flip(1), cols)
    index = (rows[:, :, None] * padded_width + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return torch.gather(padded, 2, index).view(b, c, h, w)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype=torch.float32) -> torch.Tensor:
    """(images / 255 - mean) / std per channel for uint8 input; (images - mean) / std for float input."""
    scale = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
    mean_t = torch.tensor(mean, dtype=dtype, device=images.device).view(1, -1, 1, 1)
    inv_std = 1.0 / torch.tensor(std, dtype=dtype, device=images.device).view(1, -1, 1, 1)
    return images.to(dtype).mul_(scale).sub_(mean_t).mul_(inv_std)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float (B, C, H, W) ``images`` resized to (B, C, size, size) by bilinear interpolation
    (antialiased when shrinking); unchanged when they have that size. CIFAR images upscaled
    to 224 feed ImageNet-shaped networks (ResNet-18) at the input size they were designed for."""
    if images.shape[-2:] == (size, size):
        return images
    shrinking = size < images.shape[-2] or size < images.shape[-1]
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)
