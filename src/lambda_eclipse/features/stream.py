"""A sharded, rank- and worker-aware, shuffling, exactly resumable stream of collated training batches.

How an epoch is laid out (all of it a pure function of the index, ``seed`` and ``epoch``, so every rank and worker
computes the same plan without talking to the others):

1. Every shard is cut into chunks of ``chunk_size`` consecutive samples; the chunk list is shuffled with
   (seed, epoch). Chunks rather than whole shards are the unit of distribution, so that a small store still feeds
   many ranks × workers and the split stays balanced.
2. Chunk i goes to global worker ``i % (world_size * num_workers)``; global worker g is worker ``g % num_workers``
   of rank ``g // num_workers``. Each worker reads only its chunks (contiguous, memory-mapped row ranges).
3. A worker loads ``buffer_size`` samples' worth of its chunks at a time (the shuffle buffer), permutes them with
   (seed, epoch, worker, window) and cuts its sample stream into batches of ``batch_size``; the tail that does not
   fill a batch is dropped.
4. Batch k of a rank comes from its worker ``k % num_workers`` — exactly the order in which a DataLoader
   collects an iterable dataset's batches (round-robin over workers, starting at worker 0). For that order to hold
   to the end, worker w gets ``ceil((N - w) / num_workers)`` batches, N being the rank's batch count; N is the
   same on every rank (DDP would hang otherwise) and as large as every worker's data allows. Epoch tails that do
   not fit are dropped (a fraction of a batch per worker when chunks are much smaller than a worker's share).

Each batch carries ``epoch`` and its rank-level ``batch_index``, so ``state_dict(after=batch)`` is an exact
position. After ``load_state_dict`` a fresh DataLoader again starts at worker 0, so DataLoader worker u takes the
role of original worker ``(start + u) % num_workers`` and skips the batches it had produced — without reading them.
Iterating the stream in-process (no DataLoader workers) interleaves the per-worker streams the same way, so the
order is identical with or without worker processes.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import UserError
from .block import FeatureBlock
from .collate import collate_parts
from .reader import ShardFiles


@dataclass(frozen=True)
class Chunk:
    """Samples ``[start, end)`` of shard number ``shard``."""

    shard: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass
class EpochPlan:
    """Who reads what in one epoch: ``chunks[g]`` and ``batches[g]`` for every global worker g."""

    chunks: list[list[Chunk]]
    batches: list[int]
    batches_per_rank: int


def _generator(*keys: int) -> torch.Generator:
    # Mix the keys into one 63-bit seed (splitmix-style odd constants) so nearby epochs get unrelated streams.
    state = 0x9E3779B97F4A7C15
    for key in keys:
        state = ((state ^ (key + 0x632BE59BD9B4E019)) * 0xBF58476D1CE4E5B9) % (1 << 63)
    return torch.Generator().manual_seed(state)


class FeatureStream(IterableDataset[dict[str, Any]]):
    """Iterable dataset of collated batches (keys: :func:`~lambda_eclipse.features.collate.collate_parts`, plus
    ``epoch`` and ``batch_index``).

    Use with ``DataLoader(stream, batch_size=None, num_workers=stream.num_workers)``; call ``set_epoch(e)``
    before each epoch (the DataLoader must not use ``persistent_workers``, which would keep stale epochs).

    Args:
        directory: the feature store.
        batch_size: samples per batch on this rank.
        num_workers: the DataLoader's ``num_workers`` (0 = load in the main process). It fixes the split, so it
            is part of the resume position and is checked inside the workers.
        rank, world_size: default to ``torch.distributed``'s when initialised, else 0 and 1.
        seed: shuffle seed; together with the epoch it determines the order completely.
        shuffle: shuffle chunks and samples; False gives store order within each worker's chunks.
        chunk_size: samples per chunk (the unit handed to workers).
        buffer_size: samples a worker shuffles together (memory-mapped views of the shards, not copies).
        dtype: float dtype of the batch tensors (fp32 default; fp16 halves the bytes moved to the trainer).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        batch_size: int,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        chunk_size: int = 256,
        buffer_size: int = 4096,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        if not 0 <= self.rank < self.world_size:
            raise UserError(f"rank {self.rank} is outside world_size {self.world_size}")
        if batch_size < 1 or chunk_size < 1 or buffer_size < 1 or num_workers < 0:
            raise UserError("FeatureStream needs batch_size, chunk_size, buffer_size >= 1 and num_workers >= 0")
        self.files = ShardFiles(directory)
        self.index = self.files.index
        self.batch_size, self.num_workers, self.seed, self.shuffle = batch_size, num_workers, seed, shuffle
        self.chunk_size, self.buffer_size, self.dtype = chunk_size, buffer_size, dtype
        self.epoch, self.start_batch = 0, 0
        if self.plan(0).batches_per_rank == 0:
            raise UserError(
                f"the store's {self.index.num_samples} samples give no full batch of {batch_size} to some "
                f"worker ({self.world_size} ranks × {max(num_workers, 1)} workers); use a smaller batch_size, "
                "fewer workers or a smaller chunk_size"
            )

    # ----------------------------------------------------------------------------------------------- planning
    def plan(self, epoch: int) -> EpochPlan:
        """The epoch's assignment of chunks and batch counts to all ``world_size × num_workers`` workers."""
        chunks = [
            Chunk(s, a, min(a + self.chunk_size, info.num_samples))
            for s, info in enumerate(self.index.shards)
            for a in range(0, info.num_samples, self.chunk_size)
        ]
        if self.shuffle:
            order = torch.randperm(len(chunks), generator=_generator(self.seed, epoch)).tolist()
            chunks = [chunks[i] for i in order]
        workers = max(self.num_workers, 1)
        total = self.world_size * workers
        assigned = [chunks[g::total] for g in range(total)]
        available = [sum(c.size for c in a) // self.batch_size for a in assigned]
        # Largest N with ceil((N - w) / W) <= available[w] for every worker w of every rank (see point 4).
        per_rank = min(available[g] * workers + g % workers for g in range(total))
        batches = [max(0, math.ceil((per_rank - g % workers) / workers)) for g in range(total)]
        return EpochPlan(chunks=assigned, batches=batches, batches_per_rank=per_rank)

    def __len__(self) -> int:
        """Batches this rank will yield in the current epoch (after the resume point, if any)."""
        return self.plan(self.epoch).batches_per_rank - self.start_batch

    # -------------------------------------------------------------------------------------------- positions
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its shuffle). A resume point loaded for this same epoch is kept."""
        if epoch != self.epoch:
            self.epoch, self.start_batch = epoch, 0

    def state_dict(self, after: Mapping[str, Any] | None = None) -> dict[str, int]:
        """The position to save: just after batch ``after`` when given, else the current start of iteration.

        With DataLoader workers only the batches know where they came from, so pass the last batch consumed.
        """
        epoch, seen = (
            (int(after["epoch"]), int(after["batch_index"]) + 1)
            if after is not None
            else (self.epoch, self.start_batch)
        )
        return {"epoch": epoch, "batches_seen": seen, **self._layout()}

    def _layout(self) -> dict[str, int]:
        """Everything besides (epoch, position) that fixes the order of batches; it must match on resume."""
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "world_size": self.world_size,
            "chunk_size": self.chunk_size,
            "buffer_size": self.buffer_size,
            "shuffle": int(self.shuffle),
            "num_samples": self.index.num_samples,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume at a saved position: the next iteration starts right after the saved batch."""
        for key, value in self._layout().items():
            if key in state and state[key] != value:
                raise UserError(
                    f"cannot resume the data position exactly: it was saved with {key}={state[key]}, "
                    f"the stream now has {key}={value}; use the saved settings (and the same store)"
                )
        self.epoch, self.start_batch = int(state["epoch"]), int(state["batches_seen"])
        if self.start_batch >= self.plan(self.epoch).batches_per_rank:  # the saved epoch was finished
            self.epoch, self.start_batch = self.epoch + 1, 0

    # ------------------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan = self.plan(self.epoch)
        workers = max(self.num_workers, 1)
        info = get_worker_info()
        if info is not None:
            if info.num_workers != workers:
                raise UserError(
                    f"FeatureStream was built with num_workers={self.num_workers} but runs in a DataLoader with "
                    f"num_workers={info.num_workers}; pass the same value to both"
                )
            yield from self._worker_batches(plan, (self.start_batch + info.id) % workers)
            return
        # In-process: interleave the per-worker streams exactly as the DataLoader would.
        streams = [self._worker_batches(plan, (self.start_batch + u) % workers) for u in range(workers)]
        while streams:
            for stream in list(streams):
                batch = next(stream, None)
                if batch is None:
                    streams.remove(stream)
                else:
                    yield batch

    def _worker_batches(self, plan: EpochPlan, worker: int) -> Iterator[dict[str, Any]]:
        """Batches ``worker + j * W`` (j = 0, 1, ...) of this rank, from the resume point on."""
        workers = max(self.num_workers, 1)
        g = self.rank * workers + worker
        chunks, n_batches, size = plan.chunks[g], plan.batches[g], self.batch_size
        skip = max(0, math.ceil((self.start_batch - worker) / workers))  # this worker's batches before the resume point
        first, stop = skip * size, n_batches * size  # sample positions in this worker's stream
        per_window = max(1, math.ceil(self.buffer_size / self.chunk_size))
        pieces: deque[tuple[_Window, torch.Tensor]] = deque()
        pending, position, j = 0, 0, skip
        for k, w0 in enumerate(range(0, len(chunks), per_window)):
            if position >= stop:
                break
            window = chunks[w0 : w0 + per_window]
            n = sum(c.size for c in window)
            if position + n <= first:  # entirely before the resume point: not even read
                position += n
                continue
            # The shuffle buffer: memory-mapped chunk blocks (no copy) and one permutation across all of them.
            buffer = _Window([self.files.read(c.shard, c.start, c.end) for c in window])
            order = (
                torch.randperm(n, generator=_generator(self.seed, self.epoch, g, k))
                if self.shuffle
                else torch.arange(n)
            )
            lo, hi = max(first - position, 0), min(stop - position, n)
            pieces.append((buffer, order[lo:hi]))
            pending += hi - lo
            position += n
            while pending >= size:
                batch = self._take(pieces, size)
                pending -= size
                batch["epoch"], batch["batch_index"] = self.epoch, worker + j * workers
                j += 1
                yield batch

    def _take(self, pieces: deque[tuple[_Window, torch.Tensor]], size: int) -> dict[str, Any]:
        """Collate the next ``size`` samples of the queued (window, positions) pieces."""
        parts, need = [], size
        while need:
            window, idx = pieces[0]
            parts += window.parts(idx[:need])
            if len(idx) <= need:
                pieces.popleft()
            else:
                pieces[0] = (window, idx[need:])
            need -= min(len(idx), need)
        return collate_parts(parts, self.index.max_text_len, self.dtype)


class _Window:
    """A shuffle buffer: consecutive chunk blocks addressed by one window-wide sample position."""

    def __init__(self, blocks: list[FeatureBlock]) -> None:
        self.blocks = blocks
        self.starts = torch.tensor([0] + [len(b) for b in blocks]).cumsum(0)  # (num_blocks + 1,)

    def parts(self, positions: torch.Tensor) -> list[tuple[FeatureBlock, torch.Tensor]]:
        """(block, rows) pairs covering ``positions``; grouped by block, in shuffled order within each block."""
        owner = torch.bucketize(positions, self.starts, right=True) - 1
        return [
            (self.blocks[b], positions[owner == b] - self.starts[b])
            for b in owner.unique().tolist()  # sorted, so the grouping is deterministic
        ]
