"""Stage ``filter``: every filter of appendix B as a named, configurable rule, with a count of what each dropped.

Image rules drop a whole record; box rules drop single boxes (and their masks). The order is the appendix's:
image size, box count, identical objects, white background; then per box the size ratio, the logit and the mask
share; then one box per subject word (its best), and last the number of subjects per image.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

from .records import Box, Record


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class FilterConfig:
    """The appendix-B filters; set a bound to 0 (or a range to its widest) to switch a rule off."""

    min_side: int = _f(1024, "min_resolution: drop images whose shorter side is below this many px (paper: 1024)")
    min_boxes: int = _f(1, "box_count: drop images with fewer detected boxes (paper: 1)")
    max_boxes: int = _f(8, "box_count: drop images with more detected boxes (paper: 8)")
    max_identical: int = _f(6, "identical_objects: drop images with more boxes of one word (paper: 6)")
    max_white_share: float = _f(0.1, "white_background: drop images whose near-white pixel share exceeds this (paper: 10%)")
    white_level: int = _f(245, "white_background: a pixel is near-white when all channels are at least this")
    box_ratio_min: float = _f(0.08, "box_ratio: drop boxes whose ratio is below this (paper: 0.08)")
    box_ratio_max: float = _f(0.7, "box_ratio: drop boxes whose ratio is above this (paper: 0.7)")
    box_ratio_measure: str = _f("area", "box_ratio: `area` (box area / image area) or `aspect` (width / height); the "
                                "paper says 'width-height ratio', Subject Diffusion's filter is the area share")
    min_logit: float = _f(0.3, "logit: drop boxes whose detector score is below this (paper: 0.3)")
    min_mask_share: float = _f(0.4, "mask_share: drop boxes whose mask covers less of the box than this (paper: 40%)")
    min_subjects: int = _f(1, "subjects: drop images with fewer subjects left (paper: 1)")
    max_subjects: int = _f(4, "subjects: drop images with more subjects left (paper: 4)")


IMAGE_RULES = ("min_resolution", "box_count", "identical_objects", "white_background")
BOX_RULES = ("box_ratio", "logit", "mask_share")
RULES = IMAGE_RULES + BOX_RULES + ("subjects",)


def white_share(image: Image.Image, level: int) -> float:
    """Share of pixels whose three channels are all at least ``level``."""
    return float((np.asarray(image.convert("RGB")) >= level).all(axis=-1).mean())


def box_ratio(box: Box, width: int, height: int, measure: str) -> float:
    x0, y0, x1, y1 = box.xyxy
    w, h = max(x1 - x0, 0.0), max(y1 - y0, 0.0)
    if measure == "aspect":
        return w / h if h > 0 else 0.0
    return w * h / float(width * height)


def mask_share(box: Box, mask: np.ndarray) -> float:
    """The share of the box's pixels that the mask covers."""
    x0, y0, x1, y1 = (int(round(v)) for v in box.xyxy)
    area = max(x1 - x0, 0) * max(y1 - y0, 0)
    return float(mask[y0:y1, x0:x1].sum()) / area if area else 0.0


def image_rule(record: Record, image: Image.Image, cfg: FilterConfig) -> str:
    """The first image rule ``record`` fails, or ""."""
    if min(record.width, record.height) < cfg.min_side:
        return "min_resolution"
    if not cfg.min_boxes <= len(record.boxes) <= cfg.max_boxes:
        return "box_count"
    if record.boxes and max(Counter(b.word for b in record.boxes).values()) > cfg.max_identical:
        return "identical_objects"
    if cfg.max_white_share < 1 and white_share(image, cfg.white_level) > cfg.max_white_share:
        return "white_background"
    return ""


def box_rule(box: Box, mask: np.ndarray, record: Record, cfg: FilterConfig) -> str:
    """The first box rule ``box`` fails, or ""."""
    if not cfg.box_ratio_min <= box_ratio(box, record.width, record.height, cfg.box_ratio_measure) <= cfg.box_ratio_max:
        return "box_ratio"
    if box.score < cfg.min_logit:
        return "logit"
    if mask_share(box, mask) < cfg.min_mask_share:
        return "mask_share"
    return ""


def filter_records(records: Sequence[Record], images: Sequence[Image.Image], cfg: FilterConfig
                   ) -> tuple[list[Record], Counter]:
    """Apply the rules; returns every record (dropped ones carry ``dropped`` = the rule, and no boxes) and the
    drop counts (image rules and ``subjects`` count images, box rules count boxes)."""
    drops: Counter = Counter()
    out = []
    for record, image in zip(records, images):
        kept = Record(record.source_id, record.width, record.height, record.caption, dict(record.nouns))
        rule = image_rule(record, image, cfg)
        if not rule:
            best: dict[str, tuple[Box, np.ndarray]] = {}
            for box, mask in zip(record.boxes, record.masks):
                failed = box_rule(box, mask, record, cfg)
                if failed:
                    drops[failed] += 1
                elif box.word not in best or box.score > best[box.word][0].score:
                    best[box.word] = (box, mask)
            # Subjects in caption order, so the binding numbers them the way the caption reads.
            order = [w for w in record.nouns if w in best]
            if not cfg.min_subjects <= len(order) <= cfg.max_subjects:
                rule = "subjects"
            else:
                kept.boxes = [best[w][0] for w in order]
                kept.masks = [best[w][1] for w in order]
        if rule:
            drops[rule] += 1
            kept.dropped = rule
        out.append(kept)
    return out, drops
