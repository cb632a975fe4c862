"""A columnar block of samples: the shard layout in memory, with offsets rebased to the block.

Readers load contiguous row ranges of shards as :class:`FeatureBlock` objects (memory-mapped views, no copy);
:mod:`.collate` pads batches straight out of blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .schema import STORAGE_DTYPE, FeatureSample, pack_strings


def _offsets(lengths: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    if lengths:
        out[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return out


def pack_shard(
    samples: Sequence[FeatureSample], dim: int, dtype: torch.dtype = STORAGE_DTYPE
) -> dict[str, torch.Tensor]:
    """Concatenate ``samples`` into the shard tensors of :mod:`.schema`, float parts cast to ``dtype`` (no checks)."""

    def floats(rows: list[torch.Tensor]) -> torch.Tensor:
        if not rows:
            return torch.zeros(0, dim, dtype=dtype)
        return torch.cat([r.detach().reshape(-1, dim).to("cpu", dtype) for r in rows])

    edge_index, next_edge = [], 0
    for s in samples:
        edge_index.append(next_edge if s.edge is not None else -1)
        next_edge += s.edge is not None
    captions, caption_offsets = pack_strings([s.caption for s in samples])
    source_ids, source_id_offsets = pack_strings([s.source_id for s in samples])
    owners = [s.token_subject.reshape(-1).to("cpu", torch.int8) for s in samples]
    return {
        "token_states": floats([s.token_states for s in samples]),
        "token_offsets": _offsets([s.num_tokens for s in samples]),
        "token_subject": torch.cat(owners) if owners else torch.zeros(0, dtype=torch.int8),
        "pooled_text": floats([s.pooled_text for s in samples]),
        "target": floats([s.target for s in samples]),
        "subject_embeds": floats([s.subject_embeds for s in samples]),
        "subject_offsets": _offsets([s.num_subjects for s in samples]),
        "edge": floats([s.edge for s in samples if s.edge is not None]),
        "edge_index": torch.tensor(edge_index, dtype=torch.int32),
        "caption_bytes": captions,
        "caption_offsets": caption_offsets,
        "source_id_bytes": source_ids,
        "source_id_offsets": source_id_offsets,
    }


def _decode(data: torch.Tensor, offsets: torch.Tensor) -> list[str]:
    raw, ends = bytes(data.numpy()), offsets.tolist()
    return [raw[ends[i] - ends[0] : ends[i + 1] - ends[0]].decode("utf-8") for i in range(len(ends) - 1)]


@dataclass
class FeatureBlock:
    """n samples in the shard layout with offsets rebased to 0 (shapes: T = Σ tokens, S = Σ subjects, E = edges).

    Attributes:
        token_states: (T, D); token_offsets: (n+1,) int64; token_subject: (T,) int8 subject of each token or -1.
        pooled_text, target: (n, D).
        subject_embeds: (S, D); subject_offsets: (n+1,) int64.
        edge: (E, D); edge_index: (n,) int64 row into ``edge`` or -1.
        captions, source_ids: n strings each.
    """

    token_states: torch.Tensor
    token_offsets: torch.Tensor
    token_subject: torch.Tensor
    pooled_text: torch.Tensor
    target: torch.Tensor
    subject_embeds: torch.Tensor
    subject_offsets: torch.Tensor
    edge: torch.Tensor
    edge_index: torch.Tensor
    captions: list[str]
    source_ids: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    @classmethod
    def from_tensors(cls, t: Mapping[str, Any], start: int = 0, end: int | None = None) -> FeatureBlock:
        """Rows ``[start, end)`` of a shard's tensors.

        ``t`` may map names to lazy safetensors slices (``safe_open(...).get_slice``): only the rows needed are
        read. ``end`` defaults to all rows (then ``t`` must hold tensors).
        """
        end = len(t["edge_index"]) if end is None else end
        tok_off = t["token_offsets"][start : end + 1]
        sub_off = t["subject_offsets"][start : end + 1]
        t0, t1, s0, s1 = int(tok_off[0]), int(tok_off[-1]), int(sub_off[0]), int(sub_off[-1])
        edge_index = t["edge_index"][start:end].to(torch.int64)
        present = edge_index[edge_index >= 0]
        # A block's edges are one contiguous run of rows: edge rows are numbered in sample order.
        first, last = (int(present.min()), int(present.max()) + 1) if len(present) else (0, 0)
        edge_index = torch.where(edge_index >= 0, edge_index - first, edge_index)
        cap_off, sid_off = t["caption_offsets"][start : end + 1], t["source_id_offsets"][start : end + 1]
        return cls(
            token_states=t["token_states"][t0:t1],
            token_offsets=tok_off - t0,
            token_subject=t["token_subject"][t0:t1],
            pooled_text=t["pooled_text"][start:end],
            target=t["target"][start:end],
            subject_embeds=t["subject_embeds"][s0:s1],
            subject_offsets=sub_off - s0,
            edge=t["edge"][first:last],
            edge_index=edge_index,
            captions=_decode(t["caption_bytes"][int(cap_off[0]) : int(cap_off[-1])], cap_off),
            source_ids=_decode(t["source_id_bytes"][int(sid_off[0]) : int(sid_off[-1])], sid_off),
        )

    @classmethod
    def from_samples(cls, samples: Sequence[FeatureSample], dtype: torch.dtype | None = None) -> FeatureBlock:
        """Pack in-memory samples (float parts cast to ``dtype``, default: the first sample's dtype)."""
        if not samples:
            raise ValueError("cannot build a block of zero samples")
        dim = samples[0].token_states.shape[-1]
        return cls.from_tensors(pack_shard(samples, dim, dtype or samples[0].token_states.dtype))

    @classmethod
    def concat(cls, blocks: Sequence[FeatureBlock]) -> FeatureBlock:
        """One block holding ``blocks`` back to back (offsets and edge rows shifted)."""
        blocks = [b for b in blocks if len(b)] or list(blocks[:1])
        if len(blocks) == 1:
            return blocks[0]

        def offsets(name: str) -> torch.Tensor:
            parts, base = [torch.zeros(1, dtype=torch.int64)], 0
            for b in blocks:
                off = getattr(b, name)
                parts.append(off[1:] + base)
                base += int(off[-1])
            return torch.cat(parts)

        edge_parts, base = [], 0
        for b in blocks:
            edge_parts.append(torch.where(b.edge_index >= 0, b.edge_index + base, b.edge_index))
            base += len(b.edge)
        cat = lambda name: torch.cat([getattr(b, name) for b in blocks])  # noqa: E731
        return cls(
            token_states=cat("token_states"),
            token_offsets=offsets("token_offsets"),
            token_subject=cat("token_subject"),
            pooled_text=cat("pooled_text"),
            target=cat("target"),
            subject_embeds=cat("subject_embeds"),
            subject_offsets=offsets("subject_offsets"),
            edge=cat("edge"),
            edge_index=torch.cat(edge_parts),
            captions=[c for b in blocks for c in b.captions],
            source_ids=[s for b in blocks for s in b.source_ids],
        )

    def sample(self, i: int) -> FeatureSample:
        """Sample ``i`` as a :class:`FeatureSample` (tensors are copies, in the block's dtype)."""
        t0, t1 = int(self.token_offsets[i]), int(self.token_offsets[i + 1])
        s0, s1 = int(self.subject_offsets[i]), int(self.subject_offsets[i + 1])
        e = int(self.edge_index[i])
        return FeatureSample(
            caption=self.captions[i],
            token_states=self.token_states[t0:t1].clone(),
            pooled_text=self.pooled_text[i].clone(),
            subject_embeds=self.subject_embeds[s0:s1].clone(),
            token_subject=self.token_subject[t0:t1].to(torch.int64),
            target=self.target[i].clone(),
            edge=self.edge[e].clone() if e >= 0 else None,
            source_id=self.source_ids[i],
        )


def ragged_rows(offsets: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Flat row numbers of the ragged rows of ``indices``: ``cat(arange(off[i], off[i+1]) for i in indices)``."""
    starts, lengths = offsets[indices], offsets[indices + 1] - offsets[indices]
    total = int(lengths.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.int64)
    # Position within the output minus the output start of its row, plus the row's source start.
    out_starts = lengths.cumsum(0) - lengths
    owner = torch.repeat_interleave(torch.arange(len(indices)), lengths)
    return torch.arange(total) - out_starts[owner] + starts[owner]
