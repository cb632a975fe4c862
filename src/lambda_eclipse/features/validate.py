"""Check a feature store end to end: every shard's bytes, header, counts, offsets, subject binding and values.

``validate_feature_store(dir)`` never raises for a damaged shard: it names the shard and the first problem found
in it in the report (``lambda-eclipse features validate DIR`` prints :func:`format_report` and fails when
``report.ok`` is false). Only user mistakes — no directory, no index — raise :class:`UserError`.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..checks import first_nonfinite
from ..errors import UserError
from .schema import (
    INDEX_NAME,
    SHARD_TENSORS,
    ZERO_IMAGE_NAME,
    ShardInfo,
    StoreIndex,
    read_index,
    read_zero_image,
    token_subject_problem,
)

_SAFETENSORS_DTYPES = {
    torch.float16: "F16", torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8",
}  # fmt: skip
_ROWS_PER_READ = 1 << 16  # rows per slice when scanning for NaN (bounded memory on big shards)


@dataclass
class ShardProblem:
    """A shard that cannot be trusted and why."""

    file: str
    reason: str


@dataclass
class FeatureStoreReport:
    """What :func:`validate_feature_store` found. Counts cover the shards that passed every check."""

    directory: str
    dim: int
    max_text_len: int
    num_shards: int
    num_samples: int
    index_num_samples: int
    subjects_histogram: dict[int, int] = field(default_factory=dict)
    num_with_edge: int = 0
    mean_tokens: float = 0.0
    max_tokens: int = 0
    total_bytes: int = 0
    bad_shards: list[ShardProblem] = field(default_factory=list)
    unlisted_files: list[str] = field(default_factory=list)
    zero_image_problem: str | None = None  # None: present, finite and D-dimensional

    @property
    def ok(self) -> bool:
        """Every shard readable and the zero-image embedding the trainer needs present."""
        return not self.bad_shards and self.zero_image_problem is None

    @property
    def bytes_per_sample(self) -> float:
        return self.total_bytes / self.num_samples if self.num_samples else 0.0


def _check_header(path: Path, info: ShardInfo) -> dict[str, dict]:
    """Parse the safetensors header by hand, so truncation and corruption are named rather than crash."""
    size = path.stat().st_size
    if size != info.nbytes:
        raise ValueError(f"file is {size} bytes, the index says {info.nbytes} (truncated or overwritten)")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("file shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise ValueError(f"bad header: length {header_len} exceeds the file")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"bad header: not JSON ({err.__class__.__name__})") from err
    header.pop("__metadata__", None)
    if set(header) != set(SHARD_TENSORS):
        raise ValueError(f"tensors {sorted(set(header) ^ set(SHARD_TENSORS))} missing or unexpected")
    data_len = size - 8 - header_len
    for name, meta in header.items():
        want = SHARD_TENSORS[name] or torch.float16
        if meta["dtype"] != _SAFETENSORS_DTYPES[want]:
            raise ValueError(f"{name} has dtype {meta['dtype']}, expected {_SAFETENSORS_DTYPES[want]}")
        if meta["data_offsets"][1] > data_len:
            raise ValueError(f"{name} ends past the end of the file (truncated)")
    return header


def _check_shard(path: Path, info: ShardInfo, index: StoreIndex) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Raise ValueError on the first problem; return (tokens per sample, subjects per sample, edges)."""
    header = _check_header(path, info)
    n, d = info.num_samples, index.dim
    expect = {
        "token_states": [info.num_tokens, d], "token_offsets": [n + 1], "token_subject": [info.num_tokens],
        "pooled_text": [n, d], "target": [n, d], "subject_embeds": [info.num_subjects, d],
        "subject_offsets": [n + 1], "edge": [info.num_edges, d], "edge_index": [n],
        "caption_offsets": [n + 1], "source_id_offsets": [n + 1],
    }  # fmt: skip
    for name, shape in expect.items():
        if header[name]["shape"] != shape:
            raise ValueError(f"{name} has shape {header[name]['shape']}, the index implies {shape}")
    with safe_open(str(path), framework="pt") as f:
        get = f.get_tensor
        for name, rows in (("token_offsets", info.num_tokens), ("subject_offsets", info.num_subjects)):
            off = get(name)
            if int(off[0]) != 0 or int(off[-1]) != rows or bool((off[1:] < off[:-1]).any()):
                raise ValueError(f"{name} is not a valid offset table")
        tokens = get("token_offsets").diff()
        if bool((tokens < 1).any()) or bool((tokens > index.max_text_len).any()):
            raise ValueError(f"token lengths must be 1..{index.max_text_len}")
        subjects = get("subject_offsets").diff()
        problem = token_subject_problem(get("token_subject"), tokens, subjects)
        if problem:
            raise ValueError(problem)
        edge_index = get("edge_index").to(torch.int64)
        present = edge_index[edge_index >= 0]
        if bool((edge_index < -1).any()) or not torch.equal(present, torch.arange(info.num_edges)):
            raise ValueError("edge_index does not number the edges 0..E-1 in sample order")
        for name in ("caption", "source_id"):
            off = get(f"{name}_offsets")
            raw = get(f"{name}_bytes")
            if int(off[0]) != 0 or int(off[-1]) != len(raw) or bool((off[1:] < off[:-1]).any()):
                raise ValueError(f"{name}_offsets is not a valid offset table")
            try:
                bytes(raw.numpy()).decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{name}s are not UTF-8") from err
        for name in ("token_states", "pooled_text", "target", "subject_embeds", "edge"):
            view = f.get_slice(name)
            for a in range(0, view.get_shape()[0], _ROWS_PER_READ):
                row = first_nonfinite(view[a : a + _ROWS_PER_READ])
                if row is not None:
                    raise ValueError(f"{name} holds NaN or inf (row {a + row})")
    return tokens, subjects, info.num_edges


def validate_feature_store(directory: str | os.PathLike[str]) -> FeatureStoreReport:
    """Check every shard listed in ``DIR/index.json``; see :class:`FeatureStoreReport`."""
    root = Path(directory)
    index = read_index(root)
    report = FeatureStoreReport(
        directory=str(root), dim=index.dim, max_text_len=index.max_text_len, num_shards=len(index.shards),
        num_samples=0, index_num_samples=index.num_samples,
    )  # fmt: skip
    histogram: Counter[int] = Counter()
    token_total = 0
    seen: set[str] = set()
    for info in index.shards:
        path = root / info.file
        try:
            if info.file in seen:
                raise ValueError("listed twice in the index")
            seen.add(info.file)
            if not path.is_file():
                raise ValueError("file is missing")
            tokens, subjects, edges = _check_shard(path, info, index)
        except Exception as err:  # noqa: BLE001 - any failure to read a shard is a finding, not a crash
            report.bad_shards.append(ShardProblem(info.file, str(err) or err.__class__.__name__))
            continue
        report.num_samples += info.num_samples
        report.total_bytes += info.nbytes
        report.num_with_edge += edges
        histogram.update(subjects.tolist())
        token_total += int(tokens.sum())
        report.max_tokens = max(report.max_tokens, int(tokens.max()) if len(tokens) else 0)
    try:
        if first_nonfinite(read_zero_image(root).reshape(1, -1)) is not None:
            report.zero_image_problem = "holds NaN or inf"
    except UserError as err:
        report.zero_image_problem = str(err)
    except Exception as err:  # noqa: BLE001 - an unreadable file is a finding
        report.zero_image_problem = f"unreadable ({err.__class__.__name__})"
    report.subjects_histogram = dict(sorted(histogram.items()))
    report.mean_tokens = token_total / report.num_samples if report.num_samples else 0.0
    report.unlisted_files = sorted(
        p.name
        for p in root.iterdir()
        if p.name not in (INDEX_NAME, ZERO_IMAGE_NAME) and p.name not in seen and p.suffix == ".safetensors"
    )
    return report


def format_report(report: FeatureStoreReport) -> str:
    """A human-readable summary of a :class:`FeatureStoreReport`, ending with OK or the bad shards."""
    n = report.num_samples
    histogram = ", ".join(f"{k}: {v}" for k, v in report.subjects_histogram.items()) or "none"
    lines = [
        f"feature store {report.directory}",
        f"  dim {report.dim}, max_text_len {report.max_text_len}, {report.num_shards} shards",
        f"  samples: {n} readable of {report.index_num_samples} indexed",
        f"  subjects per sample: {histogram}",
        f"  edge embeddings: {report.num_with_edge} ({100 * report.num_with_edge / n if n else 0:.1f}%)",
        f"  tokens per sample: mean {report.mean_tokens:.1f}, max {report.max_tokens}",
        f"  bytes per sample: {report.bytes_per_sample:,.0f} ({report.total_bytes / 2**20:,.1f} MiB total)",
    ]
    if report.unlisted_files:
        lines.append(
            f"  not in the index (ignored; left by an interrupted writer?): {', '.join(report.unlisted_files)}"
        )
    if report.zero_image_problem is not None:
        lines.append(f"zero-image embedding: {report.zero_image_problem}")
    if report.ok:
        lines.append("OK")
    elif report.bad_shards:
        lines.append(f"{len(report.bad_shards)} bad shard(s):")
        lines += [f"  {p.file}: {p.reason}" for p in report.bad_shards]
    return "\n".join(lines)
