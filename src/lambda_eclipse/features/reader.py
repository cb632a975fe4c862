"""Read a feature store: lazy shard handles, a map-style dataset and helpers.

Shards are opened with ``safetensors.safe_open`` (memory-mapped), so reading a sample or a range of samples
touches only those rows. Open handles are per process and are never pickled: a dataset object can be handed to
DataLoader workers and each worker opens its own files.
"""

from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from .block import FeatureBlock
from .schema import SHARD_TENSORS, FeatureSample, StoreIndex, read_index


class ShardFiles:
    """Per-process cache of open shard files of one store, reading row ranges as :class:`FeatureBlock` objects.

    At most ``max_open`` shards stay open (least recently used first out), so random access over a store of
    thousands of shards does not run out of file descriptors. Tensors already read stay valid after their
    shard is closed (safetensors keeps the mapping alive while a view of it exists).
    """

    def __init__(self, directory: str | os.PathLike[str], index: StoreIndex | None = None, max_open: int = 64) -> None:
        self.directory = Path(directory)
        self.index = index if index is not None else read_index(self.directory)
        self.max_open = max_open
        self._open: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._pid = os.getpid()

    def slices(self, shard: int) -> dict[str, Any]:
        """Lazy, sliceable views of the tensors of shard number ``shard`` (position in the index)."""
        if self._pid != os.getpid():  # forked into a worker: do not share the parent's mmaps
            self._open, self._pid = OrderedDict(), os.getpid()
        if shard in self._open:
            self._open.move_to_end(shard)
        else:
            handle = safe_open(str(self.directory / self.index.shards[shard].file), framework="pt")
            self._open[shard] = {"_handle": handle, **{name: handle.get_slice(name) for name in SHARD_TENSORS}}
            while len(self._open) > max(self.max_open, 1):
                self._open.popitem(last=False)
        return self._open[shard]

    def read(self, shard: int, start: int = 0, end: int | None = None) -> FeatureBlock:
        """Samples ``[start, end)`` of ``shard`` as one block (values stay in the stored fp16)."""
        end = self.index.shards[shard].num_samples if end is None else end
        return FeatureBlock.from_tensors(self.slices(shard), start, end)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": OrderedDict()}


class FeatureDataset(Dataset[FeatureSample]):
    """Map-style dataset over a store: ``dataset[i]`` is the i-th :class:`FeatureSample` (fp16 tensors).

    Random access costs a few memory-mapped slices per sample. For training at scale prefer
    :class:`~lambda_eclipse.features.stream.FeatureStream`, which reads contiguous chunks and collates in bulk.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.files = ShardFiles(directory)
        self.index = self.files.index
        self._starts = [0]
        for shard in self.index.shards:
            self._starts.append(self._starts[-1] + shard.num_samples)

    @property
    def dim(self) -> int:
        return self.index.dim

    @property
    def max_text_len(self) -> int:
        return self.index.max_text_len

    def __len__(self) -> int:
        return self._starts[-1]

    def locate(self, i: int) -> tuple[int, int]:
        """(shard number, row within the shard) of global sample ``i``."""
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for a store of {len(self)} samples")
        shard = bisect.bisect_right(self._starts, i) - 1
        return shard, i - self._starts[shard]

    def __getitem__(self, i: int) -> FeatureSample:
        shard, row = self.locate(int(i))
        return self.files.read(shard, row, row + 1).sample(0)


def stored_source_ids(directory: str | os.PathLike[str]) -> set[str]:
    """The ``source_id`` of every committed sample: a builder resuming into a store skips these sources."""
    files = ShardFiles(directory)
    ids: set[str] = set()
    for shard in range(len(files.index.shards)):
        s = files.slices(shard)
        offsets = s["source_id_offsets"][:].tolist()
        raw = bytes(s["source_id_bytes"][:].numpy())
        ids.update(raw[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:]))
    return ids


def load_all(directory: str | os.PathLike[str], dtype: torch.dtype | None = None) -> FeatureBlock:
    """The whole store as one in-memory block (small stores: tests, probes, evaluation of the miniature world)."""
    files = ShardFiles(directory)
    block = FeatureBlock.concat([files.read(i) for i in range(len(files.index.shards))]) if files.index.shards else None
    if block is None:
        raise ValueError(f"{str(directory)!r} holds no samples")
    if dtype is not None:
        for name in ("token_states", "pooled_text", "target", "subject_embeds", "edge"):
            setattr(block, name, getattr(block, name).to(dtype))
    return block
