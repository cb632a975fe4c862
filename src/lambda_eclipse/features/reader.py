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
from ..checks import NonFiniteError, first_nonfinite
from ..errors import UserError
from .schema import SHARD_TENSORS, FeatureSample, StoreIndex, read_index


def check_block_finite(block: FeatureBlock, where: str, first_row: int = 0) -> None:
    """Raise :class:`NonFiniteError` naming ``where``, the tensor and the sample (``first_row`` + row in the block)
    if any float part of ``block`` holds NaN or inf. One isfinite pass per part: cheap next to a training step."""
    for name, offsets in (("pooled_text", None), ("target", None), ("token_states", block.token_offsets),
                          ("subject_embeds", block.subject_offsets), ("edge", None)):
        row = first_nonfinite(getattr(block, name))
        if row is None:
            continue
        if name == "edge":
            sample = int((block.edge_index == row).nonzero()[0, 0])
        elif offsets is not None:
            sample = int(torch.searchsorted(offsets, torch.tensor(row), right=True)) - 1
        else:
            sample = row
        raise NonFiniteError(f"{where}: {name} of sample {first_row + sample} holds NaN or inf; rebuild the store "
                             "or remove that shard (`lambda-eclipse features validate` lists every bad shard)")


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
            self._open[shard] = self._open_shard(shard)
            while len(self._open) > max(self.max_open, 1):
                self._open.popitem(last=False)
        return self._open[shard]

    def _open_shard(self, shard: int) -> dict[str, Any]:
        """Open a shard, naming it in one line when it is missing, truncated or not a complete shard."""
        info = self.index.shards[shard]
        path = self.directory / info.file
        fix = f"run `lambda-eclipse features validate {self.directory}` and rebuild or remove it"
        try:
            size = path.stat().st_size
        except OSError:
            raise UserError(f"feature shard {str(path)!r} is missing; {fix}") from None
        if size != info.nbytes:
            raise UserError(f"feature shard {str(path)!r} is {size} bytes, the index says {info.nbytes} (truncated or "
                            f"overwritten); {fix}")
        try:
            handle = safe_open(str(path), framework="pt")
            return {"_handle": handle, **{name: handle.get_slice(name) for name in SHARD_TENSORS}}
        except Exception as error:  # noqa: BLE001 - safetensors raises several types for a damaged file
            raise UserError(f"feature shard {str(path)!r} cannot be read ({type(error).__name__}); {fix}") from None

    def read(self, shard: int, start: int = 0, end: int | None = None) -> FeatureBlock:
        """Samples ``[start, end)`` of ``shard`` as one block (values stay in the stored fp16).

        Raises:
            UserError: the shard is missing or damaged; NonFiniteError: a value read is NaN or inf (naming the
                shard, the tensor and the sample), so bad data stops training instead of making a NaN model.
        """
        end = self.index.shards[shard].num_samples if end is None else end
        try:
            block = FeatureBlock.from_tensors(self.slices(shard), start, end)
        except UserError:
            raise
        except Exception as error:  # noqa: BLE001 - offsets that point past the data, undecodable captions
            raise UserError(f"feature shard {str(self.directory / self.index.shards[shard].file)!r} is damaged "
                            f"({type(error).__name__}: {error}); run `lambda-eclipse features validate "
                            f"{self.directory}`") from None
        check_block_finite(block, f"feature shard {str(self.directory / self.index.shards[shard].file)!r}", start)
        return block

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
