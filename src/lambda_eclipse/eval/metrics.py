"""The judges of the evaluation harness: DINO, CLIP-I and CLIP-T (DreamBooth convention), and metric plug-ins.

All three are raw cosines (FACTS §4d), not CLIPScore's 2.5·max(cos, 0) and not ×100:

* **DINO**: cosine between ViT-S/16 DINO features of a generated and a real subject image. The feature is the
  **CLS token of the last hidden state** (``last_hidden_state[:, 0]``); HF ``ViTModel.pooler_output`` is an
  untrained pooler for DINO checkpoints and must not be used.
* **CLIP-I**: cosine between the *projected* CLIP image embeddings (``visual_projection(pooler_output)``).
* **CLIP-T**: cosine between a generated image's projected CLIP image embedding and the projected text embedding
  (``text_projection(pooler_output)``) of the prompt as written with the class noun.

A judge loads from the Hub by id (:func:`load_judges`) or is given built (tests build tiny ones from configs).
Scores are averaged per (generated, real) pair, then per prompt, subject and suite (:mod:`.scoring`).
Anything else that scores an image (the miniature world's concept oracle) is a :class:`MetricPlugin`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import UserError
from . import DEFAULT_CLIP, DEFAULT_DINO


def _rgb(images: list[Image.Image]) -> list[Image.Image]:
    from ..encoders import prepare_subject_image

    return [prepare_subject_image(i) for i in images]


@dataclass
class DinoJudge:
    """A DINO ViT (``transformers.ViTModel``) and its image processor; features are the last layer's CLS token."""

    model: Any
    processor: Any
    name: str = DEFAULT_DINO
    batch_size: int = 32

    @torch.no_grad()
    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """N PIL images -> (N, H) L2-normalised CLS features (float32, CPU)."""
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = self.processor(images=_rgb(images[i : i + self.batch_size]), return_tensors="pt").pixel_values
            pixels = pixels.to(self.model.device, self.model.dtype)
            # CLS token of the last hidden state (post final LayerNorm), not the untrained pooler.
            out.append(self.model(pixel_values=pixels).last_hidden_state[:, 0].float().cpu())
        return F.normalize(torch.cat(out), dim=-1)


@dataclass
class ClipJudge:
    """A ``transformers.CLIPModel`` with its image processor and tokenizer; projected embeddings."""

    model: Any
    processor: Any
    tokenizer: Any
    name: str = DEFAULT_CLIP
    batch_size: int = 32

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """N PIL images -> (N, P) L2-normalised projected image embeddings."""
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = self.processor(images=_rgb(images[i : i + self.batch_size]), return_tensors="pt").pixel_values
            pooled = self.model.vision_model(pixel_values=pixels.to(self.model.device, self.model.dtype)).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """N prompts -> (N, P) L2-normalised projected text embeddings (truncated to the model's context)."""
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.model.device)
        pooled = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        return F.normalize(self.model.text_projection(pooled).float().cpu(), dim=-1)


class MetricPlugin(Protocol):
    """An extra scorer (the miniature world's concept oracle is one): ``score(images, jobs)`` -> one dict per
    image, ``{metric: [values]}`` (several values where a metric is per subject or per relation of the image)."""

    name: str

    def score(self, images: Any, jobs: list[Any]) -> list[dict[str, list[float]]]: ...


@dataclass
class Judges:
    """What a run is scored with; ``describe()`` is recorded with every result."""

    dino: DinoJudge | None = None
    clip: ClipJudge | None = None
    plugins: tuple = ()

    def describe(self) -> dict[str, Any]:
        return {"dino": self.dino.name if self.dino else None, "clip": self.clip.name if self.clip else None,
                "plugins": [p.name for p in self.plugins],
                "convention": "raw cosine; DINO = last_hidden_state[:, 0]; CLIP = projected embeddings"}


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D) and (M, D) L2-normalised features -> (N,) mean cosine of each row of ``a`` over all rows of ``b``."""
    return (a @ b.T).mean(dim=1)


def load_judges(dino: str | None = DEFAULT_DINO, clip: str | None = DEFAULT_CLIP, device: str | None = None,
                dtype: torch.dtype | None = None) -> Judges:
    """Load the DINO and CLIP judges by Hub id or local folder (None skips one); one-line error if one fails."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    kwargs = {"dtype": dtype} if dtype is not None else {}
    judges = Judges()
    try:
        if dino:
            # The PIL image processors: they need no torchvision and preprocess the same.
            from transformers import ViTImageProcessorPil, ViTModel

            model = ViTModel.from_pretrained(dino, add_pooling_layer=False, **kwargs).eval()
            judges.dino = DinoJudge(model.to(device or "cpu"), ViTImageProcessorPil.from_pretrained(dino), dino)
        if clip:
            from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

            model = CLIPModel.from_pretrained(clip, **kwargs).eval()
            judges.clip = ClipJudge(model.to(device or "cpu"), CLIPImageProcessorPil.from_pretrained(clip),
                                    AutoTokenizer.from_pretrained(clip), clip)
    except (OSError, ValueError, KeyError, ImportError) as error:
        which = "DINO" if judges.dino is None and dino else "CLIP"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot load the {which} judge ({first}); give a Hub id you can reach or a local folder "
                        f"(--judge-{which.lower()})") from None
    return judges


@torch.no_grad()
def vision_tower_features(image_processor, image_encoder, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``CLIPVisionModelWithProjection`` as a judge (the miniature world's own CLIP, no DINO offline):
    N images -> projected embeddings (N, D) and the unprojected pooled (post-LN CLS) state (N, H), unnormalised.
    The pooled state, before the projection that aligns it with text, is the closest image-only ("DINO-like")
    feature such a model has."""
    pixels = image_processor(images=_rgb(images), return_tensors="pt").pixel_values
    pooled = image_encoder.vision_model(pixel_values=pixels.to(image_encoder.device, image_encoder.dtype)).pooler_output
    return image_encoder.visual_projection(pooled).float().cpu(), pooled.float().cpu()


def similarity_scores(features: dict[str, torch.Tensor], references: dict[str, list[torch.Tensor]]) -> list[dict[str, list[float]]]:
    """Per image, the cosine of its features to each of its references.

    Args:
        features: metric name -> (N, D) features of N images (any scale).
        references: metric name -> N tensors (R_k, D): image k's references (one row per subject, render, text...).
    Returns:
        N dicts ``{metric: [cosine to each reference]}`` (the plug-in row format of :class:`MetricPlugin`).
    """
    rows: list[dict[str, list[float]]] = [{} for _ in range(len(next(iter(features.values()))))]
    for name, feats in features.items():
        feats = F.normalize(feats.float(), dim=-1)
        for k, refs in enumerate(references[name]):
            rows[k][name] = (F.normalize(refs.float(), dim=-1) @ feats[k]).tolist()
    return rows
