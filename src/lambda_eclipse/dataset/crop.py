"""Stage ``crop``: each kept subject cut out by its box, masked onto white and resized keeping its aspect, and
the Canny edge map of the whole image.

The paper's point (§3.2): the mask is never resized at full resolution; the box crop of image and mask is taken
first, the background set to white, padded square with white and only then scaled to the CLIP input size.

Imports only numpy and PIL: the miniature world's renderer cuts its subject crops with :func:`subject_crop` too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from .records import Box

DEFAULT_CROP_SIZE = 224  # CLIP's input resolution
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX, "lanczos": Image.Resampling.LANCZOS,
            "bilinear": Image.Resampling.BILINEAR}
"""The filters a crop may be resized with: bicubic (CLIP's own), or box (an area mean: exact for crops that are
only ever shrunk, such as the miniature world's, cut from its 4x supersampled photograph)."""


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(H, W) bool mask with at least one pixel -> its tight box ``(x0, y0, x1, y1)``, end exclusive."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def subject_crop(image: Image.Image, mask: np.ndarray, box: Box | Sequence[float], size: int = DEFAULT_CROP_SIZE,
                 resample: str = "bicubic") -> Image.Image:
    """(H, W) RGB image + (H, W) bool mask + box (a :class:`~.records.Box` or its ``(x0, y0, x1, y1)`` in
    pixels) -> the subject on white, ``size`` x ``size``, resized with ``resample`` (a :data:`RESAMPLE` name).

    The box crop is padded with white to a square (centred) before resizing: the aspect is kept, and CLIP's
    processor (shortest side to 224, then a centre crop) sees the whole subject instead of cutting its long side.
    """
    width, height = image.size
    x0, y0, x1, y1 = getattr(box, "xyxy", box)
    x0, y0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
    x1, y1 = min(max(int(np.ceil(x1)), x0 + 1), width), min(max(int(np.ceil(y1)), y0 + 1), height)
    pixels = np.asarray(image.convert("RGB"))[y0:y1, x0:x1].copy()
    pixels[~mask[y0:y1, x0:x1]] = 255
    h, w = pixels.shape[:2]
    side = max(h, w)
    square = np.full((side, side, 3), 255, np.uint8)
    square[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = pixels
    return Image.fromarray(square).resize((size, size), RESAMPLE[resample])


def crop_subjects(images: Sequence[Image.Image], masks: Sequence[Sequence[np.ndarray]],
                  boxes: Sequence[Sequence[Box]], size: int = DEFAULT_CROP_SIZE,
                  resample: str = "bicubic") -> list[list[Image.Image]]:
    """One list of subject crops per image (the edge map is made by the features stage, from the image)."""
    return [[subject_crop(image, m, b, size, resample) for m, b in zip(ms, bs)]
            for image, ms, bs in zip(images, masks, boxes)]
