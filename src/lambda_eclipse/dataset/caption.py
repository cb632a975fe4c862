"""Stage ``caption``: BLIP-2 writes a new caption for every image (appendix B: BLIP-2 flan-t5-xl replaces the
original LAION caption)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

DEFAULT_CAPTIONER = "Salesforce/blip2-flan-t5-xl"


@dataclass
class Captioner:
    """A ``Blip2ForConditionalGeneration`` and its ``Blip2Processor``."""

    model: torch.nn.Module
    processor: object

    @classmethod
    def from_pretrained(cls, name: str = DEFAULT_CAPTIONER, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        model = Blip2ForConditionalGeneration.from_pretrained(name, dtype=dtype).to(device).eval()
        return cls(model, Blip2Processor.from_pretrained(name))


@torch.no_grad()
def caption_images(captioner: Captioner, images: Sequence[Image.Image], max_new_tokens: int = 30,
                   prompt: str = "") -> list[str]:
    """(N,) RGB images -> N captions (greedy decoding, so a rerun writes the same captions)."""
    model = captioner.model
    # Always pass text (the empty prompt too): the processor then puts the query-token placeholders in input_ids,
    # and generate needs no BOS id (T5 configs have none).
    inputs = captioner.processor(images=list(images), text=[prompt] * len(images), return_tensors="pt",
                                 padding=True).to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    if not model.config.use_decoder_only_language_model:
        return [t.strip() for t in captioner.processor.batch_decode(out, skip_special_tokens=True)]
    prompt_len = inputs["input_ids"].shape[1]  # a decoder-only LM echoes its prompt first
    return [t.strip() for t in captioner.processor.batch_decode(out[:, prompt_len:], skip_special_tokens=True)]
