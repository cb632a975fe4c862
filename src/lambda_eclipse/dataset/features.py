"""The dataset builder's last stage: captions, subject crops and images -> CLIP feature samples.

Every sample's ``token_subject`` (which tokens each subject is bound to, every occurrence of its word) comes from
:func:`lambda_eclipse.conditioning.locate_subject_tokens` and :func:`~lambda_eclipse.conditioning.subject_token_index`,
the functions the generation pipeline binds subjects with, so the trainer binds exactly the tokens inference binds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from PIL import Image

from ..conditioning import locate_subject_tokens, subject_token_index
from ..encoders import canny_edges, encode_images, encode_text, text_context_length
from ..features import FeatureSample, FeatureWriter


@dataclass
class CaptionedImage:
    """One builder record: the image, its caption, its subjects (word in the caption -> crop on white)."""

    image: Image.Image
    caption: str
    subjects: Sequence[tuple[str, Image.Image]]
    source_id: str
    with_edge: bool = True


@dataclass
class ClipEncoders:
    """The frozen encoders that make features (the same four components the pipeline holds)."""

    tokenizer: object
    text_encoder: torch.nn.Module
    image_encoder: torch.nn.Module
    image_processor: object

    @classmethod
    def from_pipeline(cls, pipe) -> "ClipEncoders":
        return cls(pipe.tokenizer, pipe.text_encoder, pipe.image_encoder, pipe.image_processor)

    @classmethod
    def from_pretrained(cls, repo: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> "ClipEncoders":
        """The four components from a repo or folder with ``tokenizer/``, ``text_encoder/``, ``image_encoder/`` and
        ``image_processor/`` (the Kandinsky 2.2 prior repo, a pipeline folder such as ``models/miniworld``)."""
        from transformers import CLIPImageProcessorPil, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

        load = dict(dtype=dtype)
        return cls(
            CLIPTokenizer.from_pretrained(repo, subfolder="tokenizer"),
            CLIPTextModelWithProjection.from_pretrained(repo, subfolder="text_encoder", **load).to(device).eval(),
            CLIPVisionModelWithProjection.from_pretrained(repo, subfolder="image_encoder", **load).to(device).eval(),
            CLIPImageProcessorPil.from_pretrained(repo, subfolder="image_processor"),
        )


@torch.no_grad()
def encode_records(encoders: ClipEncoders, records: Sequence[CaptionedImage]) -> list[FeatureSample]:
    """Encode one batch of records; images, crops and edge maps go through the vision encoder together."""
    e = encoders
    length = text_context_length(e.tokenizer, e.text_encoder)
    located = [locate_subject_tokens(e.tokenizer, r.caption, [w for w, _ in r.subjects], length) for r in records]
    text = encode_text(e.tokenizer, e.text_encoder, [r.caption for r in records])
    pictures: list[Image.Image] = []
    for r in records:
        pictures.append(r.image)
        pictures.extend(crop for _, crop in r.subjects)
        if r.with_edge:
            pictures.append(canny_edges(r.image))
    embeds = encode_images(e.image_processor, e.image_encoder, pictures).float().cpu()
    samples, cursor = [], 0
    for i, (record, tokens) in enumerate(zip(records, located)):
        target = embeds[cursor]
        subjects = embeds[cursor + 1 : cursor + 1 + len(record.subjects)]
        cursor += 1 + len(record.subjects)
        edge = None
        if record.with_edge:
            edge, cursor = embeds[cursor], cursor + 1
        # Subjects are numbered in record order, which is the order of the crops above.
        owner = subject_token_index(tokens)  # (L,) over the real tokens, BOS..EOS
        real = int(text.attention_mask[i].sum())
        if real != len(owner):  # the two tokenizations must agree, or the index would point at other tokens
            raise RuntimeError(f"caption {record.caption!r}: {real} encoded tokens but {len(owner)} located ones")
        samples.append(
            FeatureSample(
                caption=record.caption, token_states=text.token_states[i, :real].float().cpu(),
                pooled_text=text.pooled[i].float().cpu(), subject_embeds=subjects, token_subject=owner,
                target=target, edge=edge, source_id=record.source_id,
            )
        )
    return samples


def encode_stream(
    encoders: ClipEncoders, records: Iterable[CaptionedImage], batch_size: int = 256
) -> Iterator[FeatureSample]:
    """Encode records in batches, yielding samples in order."""
    batch: list[CaptionedImage] = []
    for record in records:
        batch.append(record)
        if len(batch) == batch_size:
            yield from encode_records(encoders, batch)
            batch = []
    if batch:
        yield from encode_records(encoders, batch)


def open_feature_store(encoders: ClipEncoders, directory: str | Path, shard_size: int, metadata: Mapping[str, Any],
                       append: bool = False) -> FeatureWriter:
    """The writer of a feature store for samples these encoders make: its widths (D, the text context length) and
    its zero-image embedding (the trainer's control input for samples without an edge map) come from them."""
    from ..encoders import zero_image_embedding

    return FeatureWriter(
        directory, dim=int(encoders.image_encoder.config.projection_dim),
        max_text_len=text_context_length(encoders.tokenizer, encoders.text_encoder), shard_size=shard_size,
        append=append, zero_image=zero_image_embedding(encoders.image_encoder)[0].float().cpu(), metadata=metadata,
    )
