"""A deterministic, shardable batch loader over in-memory uint8 images.

The order of an epoch and every image's crop and flip are drawn from a
generator seeded by (seed, epoch) alone, indexed by the image's position in
that epoch's order. So

* a run resumed at an epoch boundary sees exactly the batches an
  uninterrupted run sees (nothing else to checkpoint but the epoch), and
* data-parallel ranks split each global batch the way ``DistributedSampler``
  splits an epoch (rank r takes positions r, r + world, ...), so W processes
  with batch B/W see, together, the same images and augmentations as one
  process with batch B.

Example::

    loader = BatchLoader(data, batch_size=128, shuffle=True, augment=True, seed=0)
    loader.set_epoch(3)
    for x, y in loader: ...        # x float (B, 3, 32, 32) normalised, y int64 (B,)
"""

from __future__ import annotations

import atexit
import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import torch

from .augment import normalize, random_crop_flip, resize, sample_crop_flip
from .datasets import Dataset

__all__ = ["BatchLoader", "EpochPlan", "plan_epoch", "epoch_generator"]


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded by (seed, epoch, stream) only."""
    mixed = (int(seed) * 1_000_003 + int(epoch)) * 1_009 + int(stream)
    return torch.Generator().manual_seed(mixed % (2**63 - 1))


@dataclass
class EpochPlan:
    """Image index, crop offsets and flip of every position of one epoch."""

    order: torch.Tensor  # (N,) int64
    offsets: torch.Tensor  # (N, 2) int64
    flips: torch.Tensor  # (N,) bool


def plan_epoch(n: int, seed: int, epoch: int, *, shuffle: bool, augment: bool, padding: int = 4) -> EpochPlan:
    generator = epoch_generator(seed, epoch)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if augment:
        offsets, flips = sample_crop_flip(n, generator, padding)
    else:
        offsets, flips = torch.full((n, 2), padding, dtype=torch.int64), torch.zeros(n, dtype=torch.bool)
    return EpochPlan(order, offsets, flips)


class BatchLoader:
    """Batches of (normalised float images, labels) of one rank's shard.

    ``batch_size`` is per rank. ``drop_last=True`` (training) uses only whole
    global batches, so every rank takes the same number of equal steps;
    ``drop_last=False`` (evaluation) covers every image exactly once across
    the ranks, the last batch smaller. ``workers > 0`` prepares that many
    batches ahead in a background thread. ``image_size`` resizes every image
    to that square size after the crop and flip (bilinear; None: as stored).
    """

    def __init__(
        self,
        data: Dataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        channels_last: bool = False,
        workers: int = 0,
        padding: int = 4,
        image_size: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                       or image_size < 1):
            raise ValueError(f"image_size must be None or an integer >= 1, got {image_size!r}")
        self.image_size = image_size
        self.data = data
        self.batch_size = batch_size
        self.shuffle, self.augment, self.seed, self.drop_last = shuffle, augment, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.workers = workers
        self.padding = padding
        self.epoch = 0
        if drop_last and len(self) == 0:
            raise ValueError(
                f"{len(data)} images make no full global batch of {batch_size} x {world_size} rank(s); lower --batch-size"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _positions(self) -> torch.Tensor:
        """Positions in the epoch's order that this rank reads, in order."""
        n = len(self.data)
        if self.drop_last:
            global_batch = self.batch_size * self.world_size
            n = n // global_batch * global_batch
        return torch.arange(self.rank, n, self.world_size)

    def __len__(self) -> int:
        count = len(self._positions())
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def _prepare(self, plan: EpochPlan, where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = plan.order[where]
        images, labels = self.data.images[index], self.data.labels[index]
        if self.device.type == "cuda":
            images = images.pin_memory().to(self.device, non_blocking=True)
            labels = labels.pin_memory().to(self.device, non_blocking=True)
        else:
            images, labels = images.to(self.device), labels.to(self.device)
        if self.augment:
            images = random_crop_flip(images, plan.offsets[where], plan.flips[where], self.padding)
        images = normalize(images, self.data.mean, self.data.std)
        if self.image_size is not None:
            images = resize(images, self.image_size)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = plan_epoch(len(self.data), self.seed, self.epoch, shuffle=self.shuffle, augment=self.augment,
                          padding=self.padding)
        positions = self._positions()
        # One thread for these small ops (docs/performance_notes.md); the thread count is
        # per calling thread under OpenMP, so this touches no other thread.
        single = self.device.type == "cpu"
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            threads = torch.get_num_threads()
            if single:
                torch.set_num_threads(1)
            try:
                batch = self._prepare(plan, positions[start:start + self.batch_size])
            finally:
                torch.set_num_threads(threads)
            yield batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.workers <= 0:
            return self._batches()
        return _prefetch(self._batches(), self.workers)


_DONE = object()
_RUNNING: set = set()  # (stop event, thread) of live prefetchers


@atexit.register
def _stop_prefetchers() -> None:
    # A daemon thread still inside torch when the interpreter exits aborts the process.
    for stop, thread in list(_RUNNING):
        stop.set()
        thread.join(timeout=5)


def _prefetch(batches: Iterator, depth: int) -> Iterator:
    """Run ``batches`` in a daemon thread, ``depth`` items ahead of the consumer."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in batches:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as error:  # handed to the consumer
            put(error)
        finally:
            _RUNNING.discard(entry)

    thread = threading.Thread(target=produce, daemon=True, name="leanconv-prefetch")
    entry = (stop, thread)
    _RUNNING.add(entry)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
