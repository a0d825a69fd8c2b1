"""The training samplers: each epoch's order a pure function of (seed, epoch), resumable part-way through an epoch.

Every datamodule's training loader takes an :class:`EpochSampler` (or :class:`ClassBalancedSampler`) and wraps its
dataset in :class:`SeededSamples`. Both are ``DistributedSampler`` subclasses, which Lightning keeps as they are under
DDP: the ranks split one and the same order. They yield ``(epoch, index)`` keys, so that each sample draws its
augmentations from a seed of its own: a run resumed anywhere sees the rest of the epoch's images, in the same order
and augmented alike, whatever the number of loader workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler


def derived_seed(*key: int) -> int:
    """A 32-bit seed mixed from integers (numpy's ``SeedSequence``): distinct keys give independent streams."""
    return int(np.random.SeedSequence([k % 2**63 for k in key]).generate_state(1)[0])


class EpochSampler(DistributedSampler):
    """Each epoch a permutation of ``range(size)`` drawn from ``seed + epoch``, split over ``num_replicas`` ranks.

    The split is ``DistributedSampler``'s (the order padded to a multiple of the ranks, rank ``r`` takes every
    ``num_replicas``-th index from ``r``). ``start`` skips that many of this rank's indices in the next pass only: a
    run resumed part-way through an epoch continues it without an image seen twice or skipped. Yields
    ``(epoch, index)`` keys (see :class:`SeededSamples`).
    """

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        if size < 1:
            raise ValueError(f"{type(self).__name__} needs at least one sample, got size={size}")
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def epoch_order(self) -> list[int]:
        """All ranks' indices of the current epoch, in order."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=generator).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.epoch_order()
        order = (order * math.ceil(self.total_size / len(order)))[: self.total_size]
        share = order[self.rank : self.total_size : self.num_replicas]
        start, self.start = self.start, 0
        return iter([(self.epoch, index) for index in share[start:]])


class ClassBalancedSampler(EpochSampler):
    """Draws ``len(labels)`` indices an epoch, with replacement, each class equally likely (an image's weight is
    1 / its class's count); the draw of epoch ``k`` depends only on ``seed + k``, split over the ranks as in
    :class:`EpochSampler`."""

    def __init__(self, labels: Sequence[int], num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        if self.labels.numel() == 0:
            raise ValueError("ClassBalancedSampler needs at least one label")
        super().__init__(len(self.labels), num_replicas=num_replicas, rank=rank, seed=seed)
        self.weights = (1.0 / torch.bincount(self.labels).double())[self.labels]

    def epoch_order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.multinomial(self.weights, len(self.labels), replacement=True, generator=generator).tolist()


class SeededSamples(Dataset):
    """A training dataset read with ``(epoch, index)`` keys: before each sample, the dataset's albumentations
    pipeline (its ``transform``) is reseeded from ``(seed, epoch, index)``, so the sample's random augmentation
    depends on nothing else (not the worker it lands in, not where a resumed run started)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        transform = getattr(self.dataset, "transform", None)
        if hasattr(transform, "set_random_seed"):
            transform.set_random_seed(derived_seed(self.seed, 1, epoch, index))
        return self.dataset[index]
