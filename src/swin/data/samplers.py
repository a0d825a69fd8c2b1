"""Samplers the datamodules can put in their training loaders."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class ClassBalancedSampler(Sampler[int]):
    """Draws ``len(labels)`` indices an epoch, with replacement, each class equally likely (an image's weight is
    1 / its class's count).

    The same on every process: the draw of the ``k``-th pass depends only on ``seed`` and ``k``, so under DDP
    Lightning's ``DistributedSamplerWrapper`` (which it puts around any custom sampler) splits one and the same
    list between the ranks, and each epoch draws anew.
    """

    def __init__(self, labels: Sequence[int], seed: int = 0) -> None:
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        if self.labels.numel() == 0:
            raise ValueError("ClassBalancedSampler needs at least one label")
        counts = torch.bincount(self.labels).double()
        self.weights = (1.0 / counts)[self.labels]
        self.seed = seed
        self.passes = 0

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.passes)
        self.passes += 1
        yield from torch.multinomial(self.weights, len(self.labels), replacement=True, generator=generator).tolist()
