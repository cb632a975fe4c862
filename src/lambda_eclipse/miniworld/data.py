"""A rendered pool of scenes as arrays, shared by the recipes, with an on-disk cache.

Rendering is cheap (about 1,000 scenes/s) but not free; the recipes draw many batches from one fixed pool
rather than rendering every batch afresh.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_path
from .scenes import Scene, Split, iter_scenes
from .vocab import BG_COLOURS, BG_KINDS, COLOURS, SHAPES

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ScenePool:
    """N scenes and their M subject crops.

    images: (N, S, S, 3) uint8; captions_full / captions_free: N strings; crops: (M, S, S, 3) uint8;
    crop_texts: M strings "a {colour} {texture} {shape}"; crop_scene: (M,) int64, the scene of each crop;
    shape_maps: (N, S, S) uint8, 0 on the background and ``1 + SHAPES.index(shape)`` on each object's pixels;
    backgrounds: (N,) int64 (:func:`background_index`); captions_wrong_shape: N strings (:func:`wrong_shape_caption`);
    shape_rgb: (N, len(SHAPES), 3) float32, the RGB in [0, 1] each shape of the scene was painted with, NaN for
    shapes the scene does not hold (a scene holds each shape at most once).
    """

    images: np.ndarray
    captions_full: list[str]
    captions_free: list[str]
    crops: np.ndarray
    crop_texts: list[str]
    crop_scene: np.ndarray
    shape_maps: np.ndarray
    backgrounds: np.ndarray
    captions_wrong_shape: list[str]
    shape_rgb: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    @property
    def object_masks(self) -> np.ndarray:
        """(N, S, S) bool: the union of each scene's object masks."""
        return self.shape_maps > 0


def background_index(scene: Scene) -> int:
    """The scene's background as one index into ``BG_COLOURS × BG_KINDS`` (colour-major)."""
    return list(BG_COLOURS).index(scene.background_colour) * len(BG_KINDS) + list(BG_KINDS).index(
        scene.background_kind
    )


def wrong_shape_caption(scene: Scene, rng: np.random.Generator) -> str:
    """The scene's full caption with one object's shape word (chosen by ``rng``) replaced by another shape."""
    caption = scene.captions["full"]
    k = int(rng.integers(len(scene.objects)))
    start, end = scene.noun_spans["full"][k]
    others = [s for s in SHAPES if s != scene.objects[k].shape]
    return caption[:start] + others[int(rng.integers(len(others)))] + caption[end:]


def render_pool(n: int, seed: int, size: int, split: Split = "train", colour_mix: float = 0.0) -> ScenePool:
    """Render scenes 0..n-1 of stream ``seed`` (crops at the image size; ``colour_mix``: see ``render_scene``)."""
    images, full, free, crops, crop_texts, crop_scene, masks, backgrounds, wrong = [], [], [], [], [], [], [], [], []
    shape_rgb = np.full((n, len(SHAPES), 3), np.nan, np.float32)
    for i, scene in zip(range(n), iter_scenes(seed, size, split, colour_mix=colour_mix)):
        images.append(scene.image)
        backgrounds.append(background_index(scene))
        wrong.append(wrong_shape_caption(scene, np.random.default_rng([seed, i, 11])))
        shape_map = np.zeros(scene.image.shape[:2], np.uint8)
        for obj in scene.objects:
            shape_map[obj.mask] = 1 + SHAPES.index(obj.shape)
            shape_rgb[i, SHAPES.index(obj.shape)] = np.asarray(obj.rgb) / 255.0
        masks.append(shape_map)
        full.append(scene.captions["full"])
        free.append(scene.captions["appearance_free"])
        for obj in scene.objects:
            crops.append(obj.crop)
            crop_texts.append(f"a {obj.colour} {obj.texture} {obj.shape}")
            crop_scene.append(i)
    return ScenePool(
        np.stack(images), full, free, np.stack(crops), crop_texts, np.asarray(crop_scene, dtype=np.int64),
        np.stack(masks), np.asarray(backgrounds, dtype=np.int64), wrong, shape_rgb,
    )


def load_or_render_pool(path: Path, n: int, seed: int, size: int, split: Split = "train",
                        colour_mix: float = 0.0) -> ScenePool:
    """The pool cached at ``path`` (an ``.npz``) if it matches ``(n, seed, size, split, colour_mix)``, else render
    and cache it."""
    path = Path(path)
    key = np.asarray([n, seed, size, 0 if split == "train" else 1] + ([round(colour_mix * 1e6)] if colour_mix else []))
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            if np.array_equal(z["key"], key) and "shape_rgb" in z:  # older caches lack fields: rendered again
                return ScenePool(
                    z["images"], list(z["captions_full"]), list(z["captions_free"]), z["crops"],
                    list(z["crop_texts"]), z["crop_scene"], z["shape_maps"], z["backgrounds"],
                    list(z["captions_wrong_shape"]), z["shape_rgb"],
                )
    pool = render_pool(n, seed, size, split, colour_mix)
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:  # a handle: savez would append ".npz"
        np.savez(
            handle, key=key, images=pool.images, captions_full=np.asarray(pool.captions_full),
            captions_free=np.asarray(pool.captions_free), crops=pool.crops,
            crop_texts=np.asarray(pool.crop_texts), crop_scene=pool.crop_scene, shape_maps=pool.shape_maps,
            backgrounds=pool.backgrounds, captions_wrong_shape=np.asarray(pool.captions_wrong_shape),
            shape_rgb=pool.shape_rgb,
        )
    return pool


def shape_labels(pool: ScenePool) -> tuple[torch.Tensor, torch.Tensor]:
    """Which shapes each scene holds, (N, len(SHAPES)) float multi-hot, and each crop's shape, (M,) int64, read
    from the crop texts "a {colour} {texture} {shape}" (the shape is everything after the third word)."""
    crop_shape = torch.tensor([list(SHAPES).index(t.split(" ", 3)[3]) for t in pool.crop_texts], dtype=torch.long)
    scenes = torch.zeros(len(pool), len(SHAPES))
    scenes[torch.from_numpy(pool.crop_scene), crop_shape] = 1.0
    return scenes, crop_shape


def _pooled_shape_planes(shape_maps: np.ndarray | torch.Tensor, pool) -> torch.Tensor:
    """``pool`` applied to each shape's 0/1 plane of ``shape_maps`` (N, S, S): (N, len(SHAPES), s, s).

    One shape at a time: a one-hot of a 50k-scene pool's maps would hold ~1.8 GB of floats at once."""
    maps = torch.as_tensor(np.asarray(shape_maps))
    return torch.stack([pool((maps == k + 1).float()[:, None])[:, 0] for k in range(len(SHAPES))], 1)


def patch_shape_labels(shape_maps: np.ndarray | torch.Tensor, patch: int) -> torch.Tensor:
    """Per-patch shape classes (N, (S/patch)²) int64, row-major like a ViT's patch tokens: the shape covering most
    of the patch (``1 + SHAPES.index``) when it covers at least a quarter of it, else 0 (background)."""
    cover = _pooled_shape_planes(shape_maps, lambda plane: F.avg_pool2d(plane, patch))  # share of each patch
    best = cover.max(1)
    return torch.where(best.values >= 0.25, best.indices + 1, 0).flatten(1)


def off_palette_crops(pool: ScenePool) -> np.ndarray:
    """(M,) bool: crops whose object is not painted exactly its named palette colour (``colour_mix`` blends)."""
    named = np.asarray([COLOURS[t.split(" ", 2)[1]] for t in pool.crop_texts], np.float32) / 255.0
    painted = pool.shape_rgb[pool.crop_scene, shape_labels(pool)[1].numpy()]
    return np.abs(painted - named).max(-1) > 1e-4


def patch_colour_labels(shape_rgb: np.ndarray | torch.Tensor, patch_shapes: torch.Tensor) -> torch.Tensor:
    """The RGB in [0, 1] painted on each patch, (N, P, 3), NaN on background patches. shape_rgb: (N, K, 3) as in
    :class:`ScenePool`; patch_shapes: (N, P) from :func:`patch_shape_labels` (0 = background, else 1 + shape)."""
    rgb = torch.as_tensor(np.asarray(shape_rgb))
    padded = torch.cat([torch.full_like(rgb[:, :1], float("nan")), rgb], 1)  # class 0 -> NaN
    return torch.gather(padded, 1, patch_shapes[..., None].expand(-1, -1, 3))


def shape_cell_labels(shape_maps: np.ndarray | torch.Tensor, grid: int = 4) -> torch.Tensor:
    """Where each shape is: (N, len(SHAPES) · grid²) float, 1 where shape k has a pixel in cell (i, j) of a
    grid × grid split of the image (shape-major, then row-major cells)."""
    return (_pooled_shape_planes(shape_maps, lambda plane: F.adaptive_max_pool2d(plane, grid)) > 0).float().flatten(1)


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
