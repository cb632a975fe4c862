"""Stage ``segment``: SAM cuts out each detected subject, prompted with its box (appendix B)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .records import Box

DEFAULT_SEGMENTER = "facebook/sam-vit-huge"


@dataclass
class Segmenter:
    """A ``SamModel`` and its ``SamProcessor``."""

    model: torch.nn.Module
    processor: object

    @classmethod
    def from_pretrained(cls, name: str = DEFAULT_SEGMENTER, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import SamModel, SamProcessor

        model = SamModel.from_pretrained(name, dtype=dtype).to(device).eval()
        return cls(model, SamProcessor.from_pretrained(name))


@torch.no_grad()
def segment_boxes(segmenter: Segmenter, images: Sequence[Image.Image], boxes: Sequence[Sequence[Box]]
                  ) -> list[list[np.ndarray]]:
    """For each image, one (H, W) bool mask per box (SAM's single-mask output), at the image's own resolution.

    The image encoder (most of the cost) runs once on the whole batch; the prompt encoder and mask decoder then
    run per image, because images carry different numbers of boxes.
    """
    model, processor = segmenter.model, segmenter.processor
    masks: list[list[np.ndarray]] = [[] for _ in images]
    todo = [i for i, b in enumerate(boxes) if b]
    if not todo:
        return masks
    pixels = processor(images=[images[i] for i in todo], return_tensors="pt")
    embeddings = model.get_image_embeddings(pixels["pixel_values"].to(model.device, model.dtype))
    for row, i in enumerate(todo):
        prompt = processor(images=[images[i]], input_boxes=[[list(b.xyxy) for b in boxes[i]]], return_tensors="pt")
        out = model(image_embeddings=embeddings[row : row + 1], input_boxes=prompt["input_boxes"].to(model.device),
                    multimask_output=False)
        full = processor.image_processor.post_process_masks(
            out.pred_masks.float().cpu(), prompt["original_sizes"], prompt["reshaped_input_sizes"])
        masks[i] = [m[0].numpy().astype(bool) for m in full[0]]  # (boxes, 1, H, W) -> boxes x (H, W)
    return masks
