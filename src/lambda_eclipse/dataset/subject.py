"""Automatic subject segmentation for inference, reusing the builder's ``ground`` + ``segment`` + ``crop``: the
subject word's object is cut out of an ordinary photo onto white, as the paper does before encoding references
(§4: "target subject pixel regions in reference images are segmented before embedding extraction")."""

from __future__ import annotations

from PIL import Image

from ..errors import UserError
from .crop import subject_crop
from .ground import Detector, ground_subjects
from .segment import Segmenter, segment_boxes


def segment_subject(image: Image.Image, word: str, detector: Detector, segmenter: Segmenter,
                    box_threshold: float = 0.2, text_threshold: float = 0.2) -> Image.Image:
    """The highest-scoring ``word`` object of ``image``, masked onto white and padded square at its own
    resolution (no resampling; the CLIP processor resizes it later)."""
    image = image.convert("RGB")
    boxes = ground_subjects(detector, [image], [{word: word}], box_threshold, text_threshold)[0]
    if not boxes:
        raise UserError(f"no {word!r} found in the subject picture; give a photo that shows it, or one already cut "
                        "out on white without --segment")
    best = boxes[0]
    mask = segment_boxes(segmenter, [image], [[best]])[0][0]
    x0, y0, x1, y1 = best.xyxy
    side = max(int(round(x1 - x0)), int(round(y1 - y0)), 1)
    return subject_crop(image, mask, best, size=side)
