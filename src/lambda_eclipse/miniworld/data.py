"""A rendered pool of scenes as arrays, shared by the recipes, with an on-disk cache.

Rendering is cheap (about 1,000 scenes/s) but not free; the recipes draw many batches from one fixed pool
rather than rendering every batch afresh.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .scenes import Split, iter_scenes

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ScenePool:
    """N scenes and their M subject crops.

    images: (N, S, S, 3) uint8; captions_full / captions_free: N strings; crops: (M, S, S, 3) uint8;
    crop_texts: M strings "a {colour} {texture} {shape}"; crop_scene: (M,) int64, the scene of each crop;
    object_masks: (N, S, S) bool, the union of each scene's object masks.
    """

    images: np.ndarray
    captions_full: list[str]
    captions_free: list[str]
    crops: np.ndarray
    crop_texts: list[str]
    crop_scene: np.ndarray
    object_masks: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


def render_pool(n: int, seed: int, size: int, split: Split = "train") -> ScenePool:
    """Render scenes 0..n-1 of stream ``seed`` (crops at the image size)."""
    images, full, free, crops, crop_texts, crop_scene, masks = [], [], [], [], [], [], []
    for i, scene in zip(range(n), iter_scenes(seed, size, split)):
        images.append(scene.image)
        masks.append(np.any([o.mask for o in scene.objects], axis=0))
        full.append(scene.captions["full"])
        free.append(scene.captions["appearance_free"])
        for obj in scene.objects:
            crops.append(obj.crop)
            crop_texts.append(f"a {obj.colour} {obj.texture} {obj.shape}")
            crop_scene.append(i)
    return ScenePool(
        np.stack(images), full, free, np.stack(crops), crop_texts, np.asarray(crop_scene, dtype=np.int64),
        np.stack(masks),
    )


def load_or_render_pool(path: Path, n: int, seed: int, size: int, split: Split = "train") -> ScenePool:
    """The pool cached at ``path`` (an ``.npz``) if it matches ``(n, seed, size, split)``, else render and cache it."""
    path = Path(path)
    key = np.asarray([n, seed, size, 0 if split == "train" else 1])
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            if np.array_equal(z["key"], key) and "object_masks" in z:
                return ScenePool(
                    z["images"], list(z["captions_full"]), list(z["captions_free"]), z["crops"],
                    list(z["crop_texts"]), z["crop_scene"], z["object_masks"],
                )
    pool = render_pool(n, seed, size, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    np.savez(
        tmp, key=key, images=pool.images, captions_full=np.asarray(pool.captions_full),
        captions_free=np.asarray(pool.captions_free), crops=pool.crops,
        crop_texts=np.asarray(pool.crop_texts), crop_scene=pool.crop_scene, object_masks=pool.object_masks,
    )
    os.replace(tmp, path)
    return pool


def clip_pixels(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float (B, 3, S, S), normalised exactly as the saved CLIPImageProcessorPil does
    for S-px input (its resize and centre crop are the identity at that size)."""
    x = torch.tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0  # copy: crops may be read-only
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def unit_pixels(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float (B, 3, S, S) in [-1, 1], the MoVQ's input and output range."""
    return torch.tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tokenize(tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    """Token ids (len(texts), max_length), padded with the pad (= eos) token."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"]
