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


def segment_subjects(subjects: dict, out: str, detector: Detector | None = None, segmenter: Segmenter | None = None,
                     device: str | None = None, box_threshold: float = 0.2, text_threshold: float = 0.2) -> dict:
    """`generate --segment` / `encode-subject --segment`: replace every subject picture (PIL images; embedding
    paths stay as they are) by its cut-out, saved as ``<out>/segmented-<word>...png`` so the user can check it.

    The detector and segmenter default to the builder's Hub models (:data:`~.ground.DEFAULT_DETECTOR`,
    :data:`~.segment.DEFAULT_SEGMENTER`).
    """
    import torch

    from ..outputs import image_stem, save_png

    def pictures_of(value) -> list:
        return [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, Image.Image)]

    if not any(pictures_of(value) for value in subjects.values()):
        return dict(subjects)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        detector = detector or Detector.from_pretrained(device=device)
        segmenter = segmenter or Segmenter.from_pretrained(device=device)
    except OSError as error:
        raise UserError(f"--segment cannot load its detector/segmenter ({str(error).splitlines()[0]}); "
                        "drop --segment and give pictures cut out on white") from None

    def cut_out(word: str, picture):
        if not isinstance(picture, Image.Image):
            return picture  # an embedding file or tensor stays as it is
        cut = segment_subject(picture, word, detector, segmenter, box_threshold, text_threshold)
        save_png(cut, out, image_stem(f"segmented {word}", {"word": word}), {"segmented_subject": word})
        return cut

    result = {}
    for word, value in subjects.items():  # one picture, or several pictures of one subject
        result[word] = [cut_out(word, v) for v in value] if isinstance(value, (list, tuple)) else cut_out(word, value)
    return result
