"""Stage ``crop``: each kept subject cut out by its box, masked onto white and resized keeping its aspect, and
the Canny edge map of the whole image.

The paper's point (§3.2): the mask is never resized at full resolution; the box crop of image and mask is taken
first, the background set to white, padded square with white and only then scaled to the CLIP input size.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from .records import Box

DEFAULT_CROP_SIZE = 224  # CLIP's input resolution


def subject_crop(image: Image.Image, mask: np.ndarray, box: Box, size: int = DEFAULT_CROP_SIZE) -> Image.Image:
    """(H, W) RGB image + (H, W) bool mask + box -> the subject on white, ``size`` x ``size``.

    The box crop is padded with white to a square (centred) before resizing: the aspect is kept, and CLIP's
    processor (shortest side to 224, then a centre crop) sees the whole subject instead of cutting its long side.
    """
    width, height = image.size
    x0, y0, x1, y1 = box.xyxy
    x0, y0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
    x1, y1 = min(max(int(np.ceil(x1)), x0 + 1), width), min(max(int(np.ceil(y1)), y0 + 1), height)
    pixels = np.asarray(image.convert("RGB"))[y0:y1, x0:x1].copy()
    pixels[~mask[y0:y1, x0:x1]] = 255
    h, w = pixels.shape[:2]
    side = max(h, w)
    square = np.full((side, side, 3), 255, np.uint8)
    square[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = pixels
    return Image.fromarray(square).resize((size, size), Image.Resampling.BICUBIC)


def crop_subjects(images: Sequence[Image.Image], masks: Sequence[Sequence[np.ndarray]],
                  boxes: Sequence[Sequence[Box]], size: int = DEFAULT_CROP_SIZE) -> list[list[Image.Image]]:
    """One list of subject crops per image (the edge map is made by the features stage, from the image)."""
    return [[subject_crop(image, m, b, size) for m, b in zip(ms, bs)] for image, ms, bs in zip(images, masks, boxes)]
