"""Write a feature store: samples are buffered, packed into shards and committed atomically.

Crash safety: a shard is written under a temporary name and renamed into place
(:func:`lambda_eclipse.atomic.atomic_write`), and only then is it listed in ``index.json`` (itself rewritten the
same way). A crash therefore loses at most the samples of the shard
being filled; the store on disk is always a valid store of the committed shards. ``append=True`` reopens such a
store and continues after its last committed shard (use :func:`~lambda_eclipse.features.reader.stored_source_ids`
to skip the sources that are already in it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from ..atomic import atomic_write
from ..checks import first_nonfinite
from ..errors import UserError
from .block import pack_shard
from .schema import (
    FORMAT_NAME,
    INDEX_NAME,
    SCHEMA_VERSION,
    STORAGE_DTYPE,
    ZERO_IMAGE_NAME,
    FeatureSample,
    ShardInfo,
    StoreIndex,
    check_sample,
    read_index,
    read_zero_image,
    shard_file_name,
    write_index,
    write_zero_image,
)


class FeatureWriter:
    """Write samples into ``directory`` as shards of ``shard_size`` samples.

    Usage::

        with FeatureWriter(out, dim=1280, max_text_len=77) as writer:
            for sample in samples:
                writer.add(sample)      # FeatureSample or a dict with the same keys

    Args:
        directory: the store directory (created if needed).
        dim: feature dimension D of every vector (1280 for OpenCLIP ViT-bigG/14).
        max_text_len: the text encoder's maximum length (77 for CLIP); longer token states are refused.
        shard_size: samples per shard. 2048 paper-scale samples are ~110 MB, small enough for a loader worker to
            hold a few in memory and large enough that a 2M-sample store has ~1000 files.
        append: reopen an existing store and add shards after its committed ones; without it an existing
            non-empty store is an error (so that a typo cannot silently mix two datasets).
        metadata: free-form JSON-able facts to keep in the index (encoder names, builder config, ...).
        zero_image: (D,) CLIP image embedding of an all-zero image from the same encoder (see
            :func:`~lambda_eclipse.features.schema.write_zero_image`); the trainer needs it.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        dim: int,
        max_text_len: int,
        shard_size: int = 2048,
        append: bool = False,
        metadata: Mapping[str, Any] | None = None,
        zero_image: torch.Tensor | None = None,
    ) -> None:
        if shard_size < 1 or dim < 1 or max_text_len < 1:
            raise UserError("FeatureWriter needs dim, max_text_len and shard_size >= 1")
        self.directory = Path(directory)
        self.dim, self.max_text_len, self.shard_size = dim, max_text_len, shard_size
        self._pending: list[FeatureSample] = []
        self._closed = False
        self.directory.mkdir(parents=True, exist_ok=True)
        # A crash can leave temp files behind; they were never committed, so they are garbage.
        for stale in [*self.directory.glob(".tmp-*"), *self.directory.glob("*.tmp")]:  # atomic_write's, older ones'
            stale.unlink()
        if (self.directory / INDEX_NAME).exists():
            index = read_index(self.directory)
            if index.shards and not append:
                raise UserError(
                    f"{str(self.directory)!r} already holds a feature store of {index.num_samples} samples; "
                    "pass append=True to add to it, or choose an empty directory"
                )
            if (index.dim, index.max_text_len) != (dim, max_text_len):
                raise UserError(
                    f"{str(self.directory)!r} holds dim={index.dim}, max_text_len={index.max_text_len}; "
                    f"cannot append dim={dim}, max_text_len={max_text_len}"
                )
            index.metadata.update(metadata or {})
            self.index = index
        else:
            self.index = StoreIndex(dim=dim, max_text_len=max_text_len, metadata=dict(metadata or {}))
        self._next_shard = 1 + max((int(s.file.split("-")[1].split(".")[0]) for s in self.index.shards), default=-1)
        write_index(self.directory, self.index)  # an empty but valid store from the start
        if zero_image is not None:
            if zero_image.numel() != dim or first_nonfinite(zero_image) is not None:
                raise UserError(f"zero_image must be a finite ({dim},) vector, got shape {tuple(zero_image.shape)}")
            old = self.directory / ZERO_IMAGE_NAME
            if (
                append
                and old.is_file()
                and not torch.allclose(read_zero_image(self.directory), zero_image.float().cpu().reshape(-1), atol=1e-4)
            ):
                raise UserError(
                    f"{str(self.directory)!r} has another zero_image: its features come from another encoder"
                )
            write_zero_image(self.directory, zero_image)

    @property
    def num_samples(self) -> int:
        """Samples added so far, committed or pending (for an appended store, including the old ones)."""
        return self.index.num_samples + len(self._pending)

    def add(self, sample: FeatureSample | Mapping[str, Any]) -> None:
        """Validate ``sample`` (shapes, token_subject, finite, fp16 range) and buffer it; full shards are committed."""
        if self._closed:
            raise RuntimeError("FeatureWriter is closed")
        sample = FeatureSample.coerce(sample)
        check_sample(sample, self.dim, self.max_text_len)
        # Keep compact CPU copies: a builder's tensors are often views of whole GPU/fp32 batches, which pending
        # views would otherwise keep alive until the shard is written.
        own = lambda t: t.detach().to("cpu", STORAGE_DTYPE, copy=True)  # noqa: E731
        self._pending.append(
            FeatureSample(
                caption=sample.caption,
                token_states=own(sample.token_states),
                pooled_text=own(sample.pooled_text),
                subject_embeds=own(sample.subject_embeds),
                token_subject=sample.token_subject.detach().to("cpu", torch.int8, copy=True),
                target=own(sample.target),
                edge=own(sample.edge) if sample.edge is not None else None,
                source_id=sample.source_id,
            )
        )
        if len(self._pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Commit the pending samples as one (possibly short) shard, then rewrite the index."""
        if not self._pending:
            return
        tensors = pack_shard(self._pending, self.dim)
        name = shard_file_name(self._next_shard)
        data = safetensors_bytes(
            tensors,
            metadata={"format": FORMAT_NAME, "version": str(SCHEMA_VERSION), "num_samples": str(len(self._pending))},
        )
        atomic_write(self.directory / name, data, fsync=True)
        self.index.shards.append(
            ShardInfo(
                file=name,
                num_samples=len(self._pending),
                num_tokens=int(tensors["token_states"].shape[0]),
                num_subjects=int(tensors["subject_embeds"].shape[0]),
                num_edges=int(tensors["edge"].shape[0]),
                nbytes=len(data),
            )
        )
        write_index(self.directory, self.index)
        self._next_shard += 1
        self._pending = []

    def close(self) -> None:
        """Commit the last partial shard and the final index. Idempotent."""
        if not self._closed:
            self.flush()
            write_index(self.directory, self.index)
            self._closed = True

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        # On an exception keep what was committed and drop the partial shard: half-built shards from a failing
        # builder should not look like finished work.
        if exc_type is None:
            self.close()
        else:
            self._closed = True
