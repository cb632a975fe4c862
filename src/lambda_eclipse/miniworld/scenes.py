"""Procedural scenes of the miniature world: image, captions, masks, subject crops and labels.

A scene is a function of ``(seed, split)`` alone; ``size`` only sets the resolution, so the same seed
gives the same layout at 32 and 64 px, and the same bytes every time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image

from ..dataset.crop import mask_box, subject_crop
from . import draw
from .vocab import (
    BG_COLOURS,
    BG_KINDS,
    COLOURS,
    HELDOUT_TEMPLATES,
    SHAPES,
    SIZES,
    TEMPLATES,
    TEXTURES,
    TRAIN_TEMPLATES,
)

Split = Literal["train", "heldout"]
_SPLIT_CODE = {"train": 0, "heldout": 1}
SIZE_FRACTION = {"small": 0.26, "large": 0.40}
"""Object extent as a fraction of the image side."""
_GAP = 0.04  # minimum free space between two objects' boxes, in image fractions


def _reserved_instances() -> frozenset[tuple[str, str, str]]:
    """Held-out (shape, colour, texture) triples: 3 of the 32 appearances of each shape (24 of 256)."""
    rng = np.random.default_rng(20240207)
    pairs = [(c, t) for c in COLOURS for t in TEXTURES]
    out = set()
    for shape in SHAPES:
        for k in rng.choice(len(pairs), size=3, replace=False):
            out.add((shape, *pairs[int(k)]))
    return frozenset(out)


RESERVED_INSTANCES = _reserved_instances()
"""Instances that training scenes never contain; every held-out scene contains at least one."""


@dataclass(frozen=True)
class SceneObject:
    """One object instance. ``noun`` is the shape word(s) exactly as captions spell them."""

    shape: str
    colour: str
    texture: str
    size: str
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in image pixels, end exclusive, tight on ``mask``
    mask: np.ndarray = field(repr=False)  # (S, S) bool, the object's pixels in the scene image
    crop: np.ndarray = field(repr=False)  # (C, C, 3) uint8: the masked object on white, square, centred
    photo_mask: np.ndarray = field(repr=False)  # (S·scale, S·scale) bool, the object's pixels in ``Scene.photo``
    rgb: tuple[float, float, float] = field(repr=False)  # RGB in [0, 255] painted: ``colour``'s unless blended/recoloured

    @property
    def noun(self) -> str:
        return self.shape

    @property
    def heldout(self) -> bool:
        """Whether this is a reserved (never trained on) shape × colour × texture instance."""
        return (self.shape, self.colour, self.texture) in RESERVED_INSTANCES

    def phrase(self, appearance: bool = True) -> str:
        """``"a small red striped ball"`` (texture "plain" is not spoken), or ``"a ball"`` without appearance."""
        if not appearance:
            return f"a {self.noun}"
        texture = "" if self.texture == "plain" else f" {self.texture}"
        return f"a {self.size} {self.colour}{texture} {self.noun}"


@dataclass(frozen=True)
class Scene:
    """A rendered scene. ``captions``/``noun_spans`` are keyed by ``"full"`` and ``"appearance_free"``;
    ``noun_spans[kind][i]`` is the (start, end) character span of object i's noun in that caption.
    ``relations`` holds (i, relation, i + 1) for consecutive objects, in caption order."""

    seed: int
    split: str
    size: int
    image: np.ndarray = field(repr=False)  # (S, S, 3) uint8
    objects: tuple[SceneObject, ...]
    background_colour: str
    background_kind: str
    relations: tuple[tuple[int, str, int], ...]
    template: int  # index into vocab.TEMPLATES
    captions: dict[str, str]
    noun_spans: dict[str, list[tuple[int, int]]]
    photo: np.ndarray = field(repr=False)  # (S·scale, S·scale, 3) uint8: the full-resolution photograph

    @property
    def nouns(self) -> list[str]:
        return [o.noun for o in self.objects]

    def labels(self) -> dict:
        """Structured labels for an oracle classifier (plain Python types, JSON-serialisable)."""
        return {
            "objects": [
                {"shape": o.shape, "colour": o.colour, "texture": o.texture, "size": o.size, "box": list(o.box)}
                for o in self.objects
            ],
            "background": {"colour": self.background_colour, "kind": self.background_kind},
            "relations": [list(r) for r in self.relations],
        }


def _relation(a: np.ndarray, b: np.ndarray) -> str:
    """Relation of box a to box b (x0, y0, x1, y1), along the axis where they are further apart."""
    gap_x = max(b[0] - a[2], a[0] - b[2])
    gap_y = max(b[1] - a[3], a[1] - b[3])
    if gap_x >= gap_y:
        return "left of" if a[0] + a[2] < b[0] + b[2] else "right of"
    return "above" if a[1] + a[3] < b[1] + b[3] else "below"


def _layout(rng: np.random.Generator, sizes: list[str]) -> list[np.ndarray]:
    """Non-overlapping boxes (x0, y0, x1, y1) in image fractions, by rejection sampling."""
    for _ in range(1000):
        boxes: list[np.ndarray] = []
        for s in sizes:
            half = SIZE_FRACTION[s] / 2
            for _ in range(50):
                cx, cy = rng.uniform(half + 0.02, 1 - half - 0.02, size=2)
                box = np.array([cx - half, cy - half, cx + half, cy + half])
                if all(
                    max(box[0] - o[2], o[0] - box[2], box[1] - o[3], o[1] - box[3]) >= _GAP for o in boxes
                ):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == len(sizes):
            return boxes
    raise RuntimeError("no layout found")  # never happens for three objects of at most 0.4 of the side


def _sample_appearance(rng: np.random.Generator, shape: str, reserved: bool) -> tuple[str, str]:
    """(colour, texture) of a shape: a reserved pair if ``reserved``, else any non-reserved one."""
    pairs = [(c, t) for c in COLOURS for t in TEXTURES if ((shape, c, t) in RESERVED_INSTANCES) == reserved]
    return pairs[int(rng.integers(len(pairs)))]


def _caption(template: str, objects: list[SceneObject], relations: list[str], bg: str, appearance: bool):
    """Fill ``template``; return the caption and each object's noun span in it."""
    text, spans = "", []
    for i, obj in enumerate(objects):
        if i:
            text += f" {relations[i - 1]} "
        phrase = obj.phrase(appearance)
        start = len(text) + len(phrase) - len(obj.noun)
        spans.append((start, start + len(obj.noun)))
        text += phrase
    offset = template.index("{objects}")  # every template names the objects before the background
    caption = template.format(objects=text, background=bg)
    return caption, [(s + offset, e + offset) for s, e in spans]


def _mixed_colour(rng: np.random.Generator, colour: str, share: float) -> str | tuple[float, float, float]:
    """``colour``, or with probability ``share`` its RGB blended toward another palette colour (weight in [0, 1/2))."""
    if share <= 0 or rng.random() >= share:
        return colour
    other = [c for c in COLOURS if c != colour][int(rng.integers(len(COLOURS) - 1))]
    weight = 0.5 * rng.random()
    a, b = np.asarray(COLOURS[colour], np.float32), np.asarray(COLOURS[other], np.float32)
    return tuple(float(v) for v in (1 - weight) * a + weight * b)


def render_scene(
    seed: int, size: int = 32, split: Split = "train", crop_size: int | None = None, scale: int = 4,
    colour_mix: float = 0.0, recolour: dict[int, str | tuple[float, float, float]] | None = None,
) -> Scene:
    """Render scene ``seed`` of ``split`` at ``size`` px (crops at ``crop_size``, default ``size``).

    ``scale`` is the supersampling factor of the internal canvas; crops come from that canvas, as the
    paper crops subjects from the full-resolution photograph rather than from a thumbnail.
    ``colour_mix``: the share of objects painted in an off-palette colour, their palette colour blended with
    another one (weight < 1/2, so the object's colour name stays the nearer one). The draws come from a generator
    of their own: every scene is otherwise the same as with ``colour_mix=0``. ``recolour`` paints object ``i``
    (caption order) in the colour given (a palette name or an RGB triple) in place of its own; labels are unchanged.
    """
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    if size < 8:
        raise ValueError("size must be at least 8 px")
    crop_size = crop_size or size
    rng = np.random.default_rng([seed, _SPLIT_CODE[split]])
    n_obj = int(rng.integers(1, 4))
    shapes = [SHAPES[int(k)] for k in rng.choice(len(SHAPES), size=n_obj, replace=False)]
    sizes = [SIZES[int(k)] for k in rng.integers(len(SIZES), size=n_obj)]
    forced = int(rng.integers(n_obj)) if split == "heldout" else -1
    appearances = [_sample_appearance(rng, s, i == forced) for i, s in enumerate(shapes)]
    bg_colour = list(BG_COLOURS)[int(rng.integers(len(BG_COLOURS)))]
    bg_kind = BG_KINDS[int(rng.integers(len(BG_KINDS)))]
    templates = TRAIN_TEMPLATES if split == "train" else HELDOUT_TEMPLATES
    template = int(rng.integers(len(templates))) + (0 if split == "train" else len(TRAIN_TEMPLATES))
    boxes = _layout(rng, sizes)
    noise_rng = np.random.default_rng(int(rng.integers(2**31)))  # drawn last: keeps the layout stable

    canvas = draw.background(bg_colour, bg_kind, size, scale, noise_rng)
    mix_rng = np.random.default_rng([seed, _SPLIT_CODE[split], 17])
    paints = [_mixed_colour(mix_rng, colour, colour_mix) for colour, _ in appearances]
    paints = [(recolour or {}).get(i, paint) for i, paint in enumerate(paints)]
    hi_masks = [
        draw.paint_object(canvas, shape, paint, texture, tuple(box * size), size, scale)
        for shape, paint, (_, texture), box in zip(shapes, paints, appearances, boxes)
    ]
    # box filter: the canvas average over each output pixel (anti-aliasing)
    image = np.round(canvas.reshape(size, scale, size, scale, 3).mean(axis=(1, 3))).astype(np.uint8)

    photo = Image.fromarray(np.round(canvas).astype(np.uint8))  # the photograph the crops are cut from
    objects = []
    for shape, (colour, texture), sz, hi, paint in zip(shapes, appearances, sizes, hi_masks, paints):
        mask = hi.reshape(size, scale, size, scale).mean(axis=(1, 3)) >= 0.5
        box = mask_box(mask)
        crop = np.asarray(subject_crop(photo, hi, mask_box(hi), crop_size, resample="box"))  # the builder's crop
        rgb = tuple(float(v) for v in draw.paint_rgb(paint))
        objects.append(SceneObject(shape, colour, texture, sz, box, mask, crop, hi, rgb))

    rels = [_relation(boxes[i], boxes[i + 1]) for i in range(n_obj - 1)]
    bg = f"a plain {bg_colour} background" if bg_kind == "plain" else f"a {bg_colour} {bg_kind} background"
    captions, spans = {}, {}
    for kind, appearance in (("full", True), ("appearance_free", False)):
        captions[kind], spans[kind] = _caption(TEMPLATES[template], objects, rels, bg, appearance)
    return Scene(
        seed=seed,
        split=split,
        size=size,
        image=image,
        objects=tuple(objects),
        background_colour=bg_colour,
        background_kind=bg_kind,
        relations=tuple((i, r, i + 1) for i, r in enumerate(rels)),
        template=template,
        captions=captions,
        noun_spans=spans,
        photo=np.asarray(photo),
    )


def scene_seed(seed: int, index: int) -> int:
    """The seed of scene ``index`` of the stream ``seed`` (distinct for every pair)."""
    return (seed << 32) + index


def iter_scenes(
    seed: int = 0, size: int = 32, split: Split = "train", start: int = 0, crop_size: int | None = None,
    colour_mix: float = 0.0,
) -> Iterator[Scene]:
    """An endless stream of scenes ``start, start + 1, ...`` of stream ``seed``."""
    i = start
    while True:
        yield render_scene(scene_seed(seed, i), size, split, crop_size, colour_mix=colour_mix)
        i += 1


def sample_scenes(
    n: int, seed: int = 0, size: int = 32, split: Split = "train", start: int = 0, crop_size: int | None = None
) -> list[Scene]:
    """Scenes ``start .. start + n - 1`` of stream ``seed``."""
    return [render_scene(scene_seed(seed, start + i), size, split, crop_size) for i in range(n)]
