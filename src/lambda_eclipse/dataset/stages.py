"""The stage table: what each stage computes on a batch of records, shared by the local and the Ray engine.

:func:`run_stage` is the one place a stage is applied: it takes records (with their decoded images) and returns
the records the next stage reads. Records already dropped pass through untouched, so every shard keeps one row per
input image and the report can account for every image.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from PIL import Image

from ..errors import UserError
from .config import BuildConfig
from .records import Record
from .sources import BadImage, SourceRef, open_image

STAGES = ("caption", "nouns", "ground", "segment", "filter", "crop", "features")
MODEL_STAGES = {"caption": "captioner", "ground": "detector", "segment": "segmenter", "features": "encoders"}


def stage_settings(stage: str, config: BuildConfig) -> dict[str, Any]:
    """What a stage's output depends on (batch sizes and devices excluded): a change reruns it and all after."""
    m, s = config.models, config.stages
    return {
        "caption": {"captioner": m.captioner, "max_tokens": s.caption_max_tokens, "prompt": s.caption_prompt,
                    "max_pixels": config.input.max_pixels, "limit": config.input.limit, "shard_size": config.shard_size},
        "nouns": {"spacy": m.spacy, "max_nouns": s.max_nouns},
        "ground": {"detector": m.detector, "box_threshold": s.box_threshold, "text_threshold": s.text_threshold},
        "segment": {"segmenter": m.segmenter},
        "filter": asdict(config.filter),
        "crop": {"crop_size": s.crop_size, "crop_resample": s.crop_resample},
        "features": {"clip": m.clip, "edge": s.edge, "store_shard_size": config.store_shard_size},
    }[stage]


def fingerprints(config: BuildConfig) -> dict[str, str]:
    """Each stage's fingerprint: its settings chained with the previous stage's fingerprint."""
    out, previous = {}, ""
    for stage in STAGES:
        text = json.dumps([previous, stage, stage_settings(stage, config)], sort_keys=True)
        previous = out[stage] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return out


def resolve_device(config: BuildConfig) -> tuple[str, torch.dtype]:
    device = config.models.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = config.models.dtype
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


@dataclass
class StageModels:
    """The models, loaded on first use from ``config.models`` unless given (tests pass tiny ones)."""

    config: BuildConfig
    given: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str):
        if name not in self.given:
            self.given[name] = self._load(name)
        return self.given[name]

    def _load(self, name: str):
        m = self.config.models
        device, dtype = resolve_device(self.config)
        try:
            if name == "captioner":
                from .caption import Captioner

                return Captioner.from_pretrained(m.captioner, device, dtype)
            if name == "nlp":
                from .nouns import load_spacy

                return load_spacy(m.spacy)
            if name == "detector":
                from .ground import Detector

                return Detector.from_pretrained(m.detector, device, dtype)
            if name == "segmenter":
                from .segment import Segmenter

                return Segmenter.from_pretrained(m.segmenter, device, dtype)
            from .features import ClipEncoders

            return ClipEncoders.from_pretrained(m.clip, device, dtype)
        except OSError as error:
            raise UserError(f"cannot load the {name} model ({str(error).splitlines()[0]}); check models.* in the "
                            "config (a Hub id or a local folder)") from None


def load_images(records: Sequence[Record], refs: dict[str, SourceRef], max_pixels: int, target: bool = False
                ) -> list[Image.Image | None]:
    """The decoded image (``target``: the target picture, see :class:`SourceRef`) of every record still in play
    (None for dropped ones)."""
    def ref(record: Record) -> SourceRef:
        return refs[record.source_id].target_ref() if target else refs[record.source_id]

    return [None if r.dropped else open_image(ref(r), max_pixels) for r in records]


def first_records(refs: Sequence[SourceRef], max_pixels: int) -> tuple[list[Record], list[Image.Image | None]]:
    """Decode a shard's inputs: unreadable ones become records dropped as ``unreadable: <why>`` (listed, not fatal)."""
    records, images = [], []
    for ref in refs:
        try:
            image = open_image(ref, max_pixels)
            if ref.target:  # checked here, so that a bad target picture is listed too, not fatal in ``features``
                try:
                    open_image(ref.target_ref(), max_pixels)
                except BadImage as why:
                    raise BadImage(f"target picture {ref.target}: {why}") from None
            records.append(Record(ref.source_id, image.width, image.height, ref.caption))
            images.append(image)
        except BadImage as why:
            records.append(Record(ref.source_id, dropped=f"unreadable: {why}"))
            images.append(None)
    return records, images


def _batches(items: list[int], size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_stage(stage: str, records: list[Record], images: Sequence[Image.Image | None], models: StageModels,
              config: BuildConfig) -> tuple[list[Record], Counter, list]:
    """Apply ``stage`` to a shard's records; returns (records for the next stage, drops, feature samples)."""
    s = config.stages
    live = [i for i, r in enumerate(records) if not r.dropped]
    drops: Counter = Counter()
    samples: list = []
    if stage == "caption":
        if config.models.captioner != "none":
            from .caption import caption_images

            for batch in _batches(live, s.caption_batch):
                texts = caption_images(models.get("captioner"), [images[i] for i in batch], s.caption_max_tokens,
                                       s.caption_prompt)
                for i, text in zip(batch, texts):
                    records[i].caption = text
        for i in live:
            if not records[i].caption.strip():
                records[i].dropped = "no_caption"
                drops["no_caption"] += 1
    elif stage == "nouns":
        from .nouns import subject_nouns

        found = subject_nouns(models.get("nlp"), [records[i].caption for i in live], s.max_nouns)
        for i, nouns in zip(live, found):
            records[i].nouns = nouns
    elif stage == "ground":
        from .ground import ground_subjects

        for batch in _batches(live, s.ground_batch):
            boxes = ground_subjects(models.get("detector"), [images[i] for i in batch],
                                    [records[i].nouns for i in batch], s.box_threshold, s.text_threshold)
            for i, found in zip(batch, boxes):
                records[i].boxes = found
    elif stage == "segment":
        from .segment import segment_boxes

        for batch in _batches(live, s.segment_batch):
            masks = segment_boxes(models.get("segmenter"), [images[i] for i in batch], [records[i].boxes for i in batch])
            for i, found in zip(batch, masks):
                records[i].masks = found
    elif stage == "filter":
        from .filters import filter_records

        kept, drops = filter_records([records[i] for i in live], [images[i] for i in live], config.filter)
        for i, record in zip(live, kept):
            records[i] = record
    elif stage == "crop":
        from .crop import crop_subjects

        for i in live:
            records[i].crops = crop_subjects([images[i]], [records[i].masks], [records[i].boxes], s.crop_size,
                                             s.crop_resample)[0]
            records[i].masks = []  # the crops carry what later stages need; masks stay in the segment shards
    elif stage == "features":
        samples, drops = _features(records, images, live, models, config)
    else:
        raise ValueError(f"unknown stage {stage!r}")
    return records, drops, samples


def _features(records, images, live, models, config) -> tuple[list, Counter]:
    from ..conditioning import locate_subject_tokens
    from ..encoders import text_context_length
    from .features import CaptionedImage, encode_records

    encoders = models.get("encoders")
    length = text_context_length(encoders.tokenizer, encoders.text_encoder)
    drops: Counter = Counter()
    todo = []
    for i in live:
        r = records[i]
        try:  # the binding's own checks (over-long caption, words sharing tokens): drop the record, count it
            locate_subject_tokens(encoders.tokenizer, r.caption, r.words, length)
        except UserError:
            r.dropped = "binding"
            drops["binding"] += 1
            continue
        todo.append(CaptionedImage(images[i], r.caption, list(zip(r.words, r.crops)), r.source_id, config.stages.edge))
    samples = []
    for start in range(0, len(todo), config.stages.features_batch):
        samples.extend(encode_records(encoders, todo[start : start + config.stages.features_batch]))
    return samples, drops
