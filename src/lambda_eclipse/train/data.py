"""Deterministic, resumable batching of a map-style feature dataset across ranks and epochs.

The data position is one number, the count of global micro-batches already consumed. Epoch e shuffles the
training indices with a generator seeded by (seed, e); global batch g takes the next ``batch_size × world_size``
indices of its epoch and rank r takes its slice. Resuming at position p therefore reproduces the exact stream,
whatever the number of DataLoader workers.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Infinite batch sampler over ``indices``: yields this rank's batches from global batch ``start`` onwards."""

    def __init__(
        self,
        indices: Sequence[int],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ) -> None:
        self.indices = torch.as_tensor(list(indices), dtype=torch.long)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = len(self.indices) // self.global_batch
        if self.batches_per_epoch == 0:
            from ..errors import UserError

            raise UserError(
                f"{len(self.indices)} training samples cannot fill one global batch of {self.global_batch}; "
                "lower data.batch_size or add data"
            )
        self.start = start

    def epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return self.indices[torch.randperm(len(self.indices), generator=generator)]

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start
        while True:
            epoch, within = divmod(position, self.batches_per_epoch)
            order = self.epoch_order(epoch)
            for batch in range(within, self.batches_per_epoch):
                offset = batch * self.global_batch + self.rank * self.batch_size
                yield order[offset : offset + self.batch_size].tolist()
            position = (epoch + 1) * self.batches_per_epoch

    def __len__(self) -> int:  # one epoch; the sampler itself never ends
        return self.batches_per_epoch
