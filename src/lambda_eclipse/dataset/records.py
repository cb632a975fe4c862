"""The record every builder stage reads and extends, and how a shard of records is stored between stages.

A stage's output for one input shard is ``<stage>/shard-NNNNN.jsonl`` (one JSON line per record: the scalar
fields) plus, for stages that make pictures, ``shard-NNNNN.safetensors`` (masks bit-packed, crops PNG-encoded),
each written atomically: a shard file exists complete or not at all, which is what resuming relies on.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path, atomic_write


@dataclass
class Box:
    """A detected subject: the caption word it grounds, pixel box ``(x0, y0, x1, y1)``, detector score."""

    word: str
    xyxy: tuple[float, float, float, float]
    score: float


@dataclass
class Record:
    """One image on its way through the stages; each stage fills its own fields.

    Attributes:
        source_id: the input's stable id (see :class:`~lambda_eclipse.dataset.sources.SourceRef`).
        width, height: the decoded image size.
        caption: the caption (BLIP-2's, or the input's own when captioning is off).
        nouns: subject words of the caption (caption order, unique) -> the phrase grounded for each.
        boxes: detections (``ground``); after ``filter`` only the chosen box of each kept subject, in subject order.
        masks: (H, W) bool masks, one per box (``segment``; ``filter`` keeps those of the kept boxes).
        crops: one subject crop on white per kept box (``crop``).
        dropped: the filter rule that dropped the whole record, or "" if kept.
    """

    source_id: str
    width: int = 0
    height: int = 0
    caption: str = ""
    nouns: dict[str, str] = field(default_factory=dict)
    boxes: list[Box] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    crops: list[Image.Image] = field(default_factory=list)
    dropped: str = ""

    @property
    def words(self) -> list[str]:
        """Subject words of the kept boxes, in order (after ``filter`` one box per word)."""
        return [b.word for b in self.boxes]

    def scalars(self) -> dict:
        return {"source_id": self.source_id, "width": self.width, "height": self.height, "caption": self.caption,
                "nouns": self.nouns, "boxes": [asdict(b) for b in self.boxes], "dropped": self.dropped}

    @classmethod
    def from_scalars(cls, row: dict) -> Record:
        boxes = [Box(b["word"], tuple(b["xyxy"]), float(b["score"])) for b in row.get("boxes", [])]
        return cls(row["source_id"], row.get("width", 0), row.get("height", 0), row.get("caption", ""),
                   dict(row.get("nouns", {})), boxes, dropped=row.get("dropped", ""))


def _png(image: Image.Image) -> torch.Tensor:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def write_shard(path: Path, records: list[Record]) -> None:
    """Write records to ``path`` (``.jsonl``) and their masks/crops beside it (``.safetensors``), atomically;
    the ``.jsonl`` goes last, so its presence means the shard is complete."""
    tensors: dict[str, torch.Tensor] = {}
    rows = []
    for i, r in enumerate(records):
        row = r.scalars()
        row["mask_shapes"] = [list(m.shape) for m in r.masks]
        row["num_crops"] = len(r.crops)
        for k, mask in enumerate(r.masks):
            tensors[f"{i}.mask.{k}"] = torch.from_numpy(np.packbits(mask.astype(bool).ravel()))
        for k, crop in enumerate(r.crops):
            tensors[f"{i}.crop.{k}"] = _png(crop)
        rows.append(json.dumps(row, ensure_ascii=False))
    if tensors:
        with atomic_path(path.with_suffix(".safetensors")) as temporary:
            save_file(tensors, str(temporary))
    atomic_write(path, "\n".join(rows) + ("\n" if rows else ""))


def read_shard(path: Path) -> list[Record]:
    """Read a shard written by :func:`write_shard`."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    blobs = path.with_suffix(".safetensors")
    tensors = load_file(str(blobs)) if blobs.is_file() else {}
    records = []
    for i, line in enumerate(lines):
        row = json.loads(line)
        record = Record.from_scalars(row)
        for k, shape in enumerate(row.get("mask_shapes", [])):
            bits = np.unpackbits(tensors[f"{i}.mask.{k}"].numpy())[: shape[0] * shape[1]]
            record.masks.append(bits.reshape(shape).astype(bool))
        for k in range(row.get("num_crops", 0)):
            with Image.open(io.BytesIO(tensors[f"{i}.crop.{k}"].numpy().tobytes())) as crop:
                record.crops.append(crop.convert("RGB"))
        records.append(record)
    return records
