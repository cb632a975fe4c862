"""Stage ``crop``: each kept subject cut out by its box, masked onto white and resized keeping its aspect, and
the Canny edge map of the whole image.

The paper's point (§3.2): the mask is never resized at full resolution; the box crop of image and mask is taken
first, the background set to white, and only the crop is scaled so its longer side is the CLIP input size.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from .records import Box

DEFAULT_CROP_SIZE = 224  # CLIP's input resolution


def subject_crop(image: Image.Image, mask: np.ndarray, box: Box, size: int = DEFAULT_CROP_SIZE) -> Image.Image:
    """(H, W) RGB image + (H, W) bool mask + box -> the subject on white, longer side ``size`` (aspect kept)."""
    width, height = image.size
    x0, y0, x1, y1 = box.xyxy
    x0, y0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
    x1, y1 = min(max(int(np.ceil(x1)), x0 + 1), width), min(max(int(np.ceil(y1)), y0 + 1), height)
    pixels = np.asarray(image.convert("RGB"))[y0:y1, x0:x1].copy()
    pixels[~mask[y0:y1, x0:x1]] = 255
    crop = Image.fromarray(pixels)
    scale = size / max(crop.size)
    target = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
    return crop.resize(target, Image.Resampling.BICUBIC)


def crop_subjects(images: Sequence[Image.Image], masks: Sequence[Sequence[np.ndarray]],
                  boxes: Sequence[Sequence[Box]], size: int = DEFAULT_CROP_SIZE) -> list[list[Image.Image]]:
    """One list of subject crops per image (the edge map is made by the features stage, from the image)."""
    return [[subject_crop(image, m, b, size) for m, b in zip(ms, bs)] for image, ms, bs in zip(images, masks, boxes)]
