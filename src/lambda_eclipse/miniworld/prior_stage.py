"""The miniature world's prior stage: rendered scenes -> feature stores (tiny CLIP) -> priors trained with our trainer.

This is the paper's data recipe in miniature: the scene caption (with or without appearance words) is the text,
each object's crop on white is a subject bound to its noun, the whole scene is the target, and its Canny edge map
is the optional control.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from ..dataset.features import CaptionedImage, ClipEncoders, encode_stream, open_feature_store
from ..features import read_index, stored_source_ids
from .scenes import Split, iter_scenes

CONFIG = Path(__file__).with_name("prior.yaml")  # the shipped prior's recipe, package data


@dataclass(frozen=True)
class FeatureRecipe:
    """How scenes become feature samples."""

    train_scenes: int = 50000
    val_scenes: int = 1024
    appearance_free_prob: float = 0.5  # captions without colour/texture words: appearance must come from subjects
    edge_prob: float = 0.5  # samples with an edge embedding (the rest use the zero-image control)
    seed: int = 1  # scene stream of the prior's data (the components used stream 0)
    batch: int = 256


def scene_choices(seed: int, index: int, recipe: FeatureRecipe) -> tuple[str, bool]:
    """Scene ``index`` of stream ``seed``: which caption it is trained with (``"full"`` or ``"appearance_free"``) and
    whether its sample stores an edge map (deterministic per scene)."""
    rng = np.random.default_rng([seed, index, 7])
    kind = "appearance_free" if rng.random() < recipe.appearance_free_prob else "full"
    return kind, bool(rng.random() < recipe.edge_prob)


def scene_records(n: int, seed: int, size: int, split: Split, recipe: FeatureRecipe, skip: set[str]) -> Iterator[CaptionedImage]:
    """The first ``n`` scenes of a stream as builder records: the scene image is the target, each object's crop
    (cut from the scene's photograph by the builder's :func:`~lambda_eclipse.dataset.crop.subject_crop`) a subject."""
    for index, scene in zip(range(n), iter_scenes(seed, size, split)):
        source_id = f"{split}-{seed}-{index}"
        if source_id in skip:
            continue
        kind, with_edge = scene_choices(seed, index, recipe)
        yield CaptionedImage(
            image=Image.fromarray(scene.image),
            caption=scene.captions[kind],
            subjects=[(o.noun, Image.fromarray(o.crop)) for o in scene.objects],
            source_id=source_id,
            with_edge=with_edge,
        )


def write_scene_features(
    encoders: ClipEncoders, out_dir: str | Path, n: int, split: Split, size: int, recipe: FeatureRecipe
) -> Path:
    """Encode ``n`` scenes into a feature store at ``out_dir``; resumes a partial store, skips a complete one."""
    import torch

    out_dir = Path(out_dir)
    if (out_dir / "index.json").is_file() and read_index(out_dir).num_samples >= n:
        return out_dir
    done = stored_source_ids(out_dir) if (out_dir / "index.json").is_file() else set()
    metadata = {"source": "miniworld", "split": split, "size": size, "recipe": recipe.__dict__}
    writer = open_feature_store(encoders, out_dir, 4096, metadata, append=bool(done))
    with writer, torch.inference_mode():
        for sample in encode_stream(encoders, scene_records(n, recipe.seed, size, split, recipe, done), recipe.batch):
            writer.add(sample)
    return out_dir


def train_miniworld_prior(train_dir: Path, val_dir: Path, out_dir: Path, lambda_contrastive: float, overrides=()) -> Path:
    """Train one prior with `train-prior` on the miniature features; returns its exported ``prior/`` folder."""
    from ..train import load_config, train_prior

    index = read_index(train_dir)  # the prior's widths follow the encoders that made the features
    config = load_config(
        CONFIG,
        [f"data.train_dir={train_dir}", f"data.val_dir={val_dir}", f"loss.lambda_contrastive={lambda_contrastive}",
         f"model.embedding_dim={index.dim}", f"model.num_embeddings={index.max_text_len}", *overrides],
        output_dir=str(out_dir),
    )
    return train_prior(config) / "prior"
