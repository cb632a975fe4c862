"""Stage ``ground``: Grounding DINO finds a box for each subject phrase (appendix B: box and text thresholds 0.2).

All phrases of one caption go into one detector prompt (``"brown dog . hat ."``); each predicted box is given to
the phrase whose tokens it scores highest, so a box grounds exactly one subject word.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from .records import Box

DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-base"


@dataclass
class Detector:
    """A ``GroundingDinoForObjectDetection`` and its ``GroundingDinoProcessor``."""

    model: torch.nn.Module
    processor: object

    @classmethod
    def from_pretrained(cls, name: str = DEFAULT_DETECTOR, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        model = GroundingDinoForObjectDetection.from_pretrained(name, dtype=dtype).to(device).eval()
        return cls(model, AutoProcessor.from_pretrained(name))


def detector_prompt(phrases: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """``["dog", "red hat"]`` -> ``("dog . red hat .", [(0, 3), (6, 13)])``: the prompt and each phrase's characters."""
    text, spans = "", []
    for phrase in phrases:
        spans.append((len(text), len(text) + len(phrase)))
        text += phrase + " . "
    return text.strip(), spans


@torch.no_grad()
def ground_subjects(detector: Detector, images: Sequence[Image.Image], nouns: Sequence[dict[str, str]],
                    box_threshold: float = 0.2, text_threshold: float = 0.2) -> list[list[Box]]:
    """For each image and its ``{word: phrase}``, the boxes (pixel ``xyxy``) whose best score is at least
    ``box_threshold`` and whose score for their phrase is at least ``text_threshold``, highest score first."""
    from transformers.image_transforms import center_to_corners_format

    results: list[list[Box]] = [[] for _ in images]
    todo = [i for i, n in enumerate(nouns) if n]  # a caption without nouns has nothing to look for
    if not todo:
        return results
    prompts = [detector_prompt(list(nouns[i].values())) for i in todo]
    model, processor = detector.model, detector.processor
    inputs = processor(images=[images[i] for i in todo], text=[p for p, _ in prompts], return_tensors="pt",
                       padding=True).to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model(**inputs)
    probs = out.logits.float().sigmoid()  # (B, Q, T): each query's score for each prompt token
    boxes = center_to_corners_format(out.pred_boxes.float())  # (B, Q, 4) in [0, 1]
    for b, i in enumerate(todo):
        text, spans = prompts[b]
        offsets = processor.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        tokens = [[t for t, (a, e) in enumerate(offsets) if e > a and a < end and e > start] for start, end in spans]
        words = list(nouns[i])
        width, height = images[i].size
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        best = probs[b].max(dim=-1).values  # (Q,)
        phrase_scores = torch.stack([probs[b][:, t].max(dim=-1).values for t in tokens], dim=-1)  # (Q, P)
        score, owner = phrase_scores.max(dim=-1)
        keep = (best >= box_threshold) & (score >= text_threshold)
        found = [Box(words[int(owner[q])], tuple(round(float(v), 2) for v in (boxes[b, q].cpu() * scale).clamp(min=0)),
                     round(float(score[q]), 4)) for q in keep.nonzero().flatten().tolist()]
        results[i] = sorted(found, key=lambda box: -box.score)
    return results
