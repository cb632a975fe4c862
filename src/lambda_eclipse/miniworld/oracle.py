"""The concept oracle: a small CNN that reads a miniature-world image back into labels (ConceptBed-style judge).

For every shape category it predicts presence, colour, texture, size and the object's centre; for the scene, the
background colour and kind. The per-shape heads make multi-object scenes unambiguous: a scene never holds two
objects of the same shape (``render_scene`` draws shapes without replacement), so "the ball's colour" is
well defined. Should that ever change, the target of a shape is its largest instance (:func:`scene_targets`).

Each shape has its own spatial attention over the feature map: the centre is the attention's soft-argmax and the
colour/texture/size heads read the attention-pooled features, so they describe *that* object, not the scene.

Training (:func:`~lambda_eclipse.miniworld.oracle_train.train_oracle`, also importable from here) renders train-split scenes, optionally adds their MoVQ reconstructions (what a
decoder produces looks like them), and augments with blur, noise and a light colour jitter that keeps every colour
name, because generated images are blurrier and noisier than renders.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .scenes import Scene
from .vocab import BG_COLOURS, BG_KINDS, COLOURS, SHAPES, SIZES, TEXTURES

COLOUR_NAMES, BG_COLOUR_NAMES = tuple(COLOURS), tuple(BG_COLOURS)
K, NC, NT, NS = len(SHAPES), len(COLOURS), len(TEXTURES), len(SIZES)
_PER_SHAPE = 1 + NC + NT + NS  # presence logit, colour, texture and size logits of one shape
WEIGHTS, CONFIG = "model.safetensors", "oracle.json"
Images = Sequence[Image.Image] | torch.Tensor | np.ndarray


def relation_from_centres(a: Sequence[float], b: Sequence[float]) -> str:
    """Relation of object a to object b from their (x, y) centres, as ``scenes._relation`` names it.

    The layout's boxes are squares, so "further apart along x than y" on the box gaps is the same test as
    ``|dx| >= |dy|`` on the centres.
    """
    dx, dy = b[0] - a[0], b[1] - a[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


# ------------------------------------------------------------------------------------------------ network
def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    # GroupNorm, not BatchNorm: the judge must score a batch of 3 generated images exactly as one of 300
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.SiLU())


class OracleNet(nn.Module):
    """(N, 3, S, S) images in [0, 1] -> logits per shape and for the background (S divisible by 4).

    About 0.25 M parameters at ``width=24``; features are read at S/4 resolution (8 × 8 for 32 px).
    """

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv(3, w), _conv(w, 2 * w, 2), _conv(2 * w, 2 * w), _conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w),
            _conv(4 * w, 4 * w),
        )
        c = 4 * w
        self.attend = nn.Conv2d(c, K, 1)  # one attention map per shape
        self.shape_w = nn.Parameter(torch.randn(K, c, _PER_SHAPE) / c**0.5)  # per-shape linear heads
        self.shape_b = nn.Parameter(torch.zeros(K, _PER_SHAPE))
        # the background needs layout (a gradient is light at the top), so it reads a coarse 4x4 map, flattened
        self.bg_reduce = nn.Sequential(nn.Conv2d(c, 16, 1), nn.SiLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.bg_head = nn.Sequential(nn.Linear(256, 64), nn.SiLU(), nn.Linear(64, len(BG_COLOURS) + len(BG_KINDS)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (N, 3, S, S) in [0, 1] -> presence (N, K), colour (N, K, NC), texture (N, K, NT),
        size (N, K, NS) logits, centre (N, K, 2) as (x, y) fractions of the side, bg_colour (N, 5), bg_kind (N, 4)."""
        f = self.features(images * 2 - 1)  # (N, C, h, w)
        h, w = f.shape[-2:]
        attn = self.attend(f).flatten(2).softmax(-1)  # (N, K, h*w)
        ys = (torch.arange(h, dtype=f.dtype, device=f.device) + 0.5) / h
        xs = (torch.arange(w, dtype=f.dtype, device=f.device) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(h * w, 2)  # (h*w, 2) as (x, y)
        centre = attn @ grid  # soft-argmax, (N, K, 2)
        pooled = attn @ f.flatten(2).transpose(1, 2)  # (N, K, C): each shape's own features
        out = torch.einsum("nkc,kco->nko", pooled, self.shape_w) + self.shape_b
        bg = self.bg_head(self.bg_reduce(f))
        return {
            "presence": out[..., 0],
            "colour": out[..., 1 : 1 + NC],
            "texture": out[..., 1 + NC : 1 + NC + NT],
            "size": out[..., 1 + NC + NT :],
            "centre": centre,
            "bg_colour": bg[:, : len(BG_COLOURS)],
            "bg_kind": bg[:, len(BG_COLOURS) :],
        }


# ------------------------------------------------------------------------------------------------ readings
@dataclass
class ShapeReading:
    """What the oracle reads about one shape category; ``*_conf`` are softmax probabilities of the choice."""

    present: float  # probability that an object of this shape is in the image
    colour: str
    colour_conf: float
    texture: str
    texture_conf: float
    size: str
    size_conf: float
    centre: tuple[float, float]  # (x, y) in fractions of the image side; meaningful only when present


@dataclass
class SceneReading:
    """The oracle's reading of one image: every shape (present or not) and the background."""

    shapes: dict[str, ShapeReading]
    background_colour: str
    background_colour_conf: float
    background_kind: str
    background_kind_conf: float

    def present(self, threshold: float = 0.5) -> list[str]:
        """Shapes read as present, in vocabulary order."""
        return [s for s, r in self.shapes.items() if r.present >= threshold]

    def relation(self, a: str, b: str) -> str:
        """Relation of shape ``a`` to shape ``b`` from their read centres."""
        return relation_from_centres(self.shapes[a].centre, self.shapes[b].centre)


def to_tensor(images: Images) -> torch.Tensor:
    """PIL list, uint8/float (N, H, W, 3) array, or (N, 3, H, W) tensor in [0, 1] -> float (N, 3, H, W) in [0, 1]."""
    if isinstance(images, torch.Tensor):
        return images.float()
    if isinstance(images, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(images))
        x = x.float() / 255.0 if images.dtype == np.uint8 else x.float()
        return x.permute(0, 3, 1, 2)
    arrays = [np.asarray(i.convert("RGB")) for i in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


class Oracle:
    """A trained :class:`OracleNet` with its config; reads images of any size (resized to the trained size)."""

    def __init__(self, net: OracleNet, config: dict) -> None:
        self.net, self.config = net.eval(), config
        self.size = int(config["size"])

    @torch.no_grad()
    def probs(self, images: Images, batch: int = 256) -> dict[str, torch.Tensor]:
        """Probabilities: presence (N, K), colour (N, K, NC), texture (N, K, NT), size (N, K, NS),
        centre (N, K, 2), bg_colour (N, 5), bg_kind (N, 4)."""
        x = to_tensor(images)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        parts: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(x), batch):
            for key, value in self.net(x[i : i + batch].clamp(0, 1)).items():
                if key == "presence":
                    value = value.sigmoid()
                elif key != "centre":
                    value = value.softmax(-1)
                parts.setdefault(key, []).append(value)
        return {k: torch.cat(v) for k, v in parts.items()}

    def read(self, images: Images) -> list[SceneReading]:
        """Images -> one :class:`SceneReading` each."""
        p = self.probs(images)
        out = []
        for n in range(len(p["presence"])):
            shapes = {}
            for k, shape in enumerate(SHAPES):
                c, t, s = p["colour"][n, k], p["texture"][n, k], p["size"][n, k]
                shapes[shape] = ShapeReading(
                    present=float(p["presence"][n, k]),
                    colour=COLOUR_NAMES[int(c.argmax())], colour_conf=float(c.max()),
                    texture=TEXTURES[int(t.argmax())], texture_conf=float(t.max()),
                    size=SIZES[int(s.argmax())], size_conf=float(s.max()),
                    centre=(float(p["centre"][n, k, 0]), float(p["centre"][n, k, 1])),
                )
            bc, bk = p["bg_colour"][n], p["bg_kind"][n]
            out.append(SceneReading(shapes, BG_COLOUR_NAMES[int(bc.argmax())], float(bc.max()),
                                    BG_KINDS[int(bk.argmax())], float(bk.max())))
        return out


def load_oracle(path: str | os.PathLike) -> Oracle:
    """Load an oracle folder written by :func:`train_oracle` (``oracle.json`` + ``model.safetensors``)."""
    from safetensors.torch import load_file

    from ..errors import UserError

    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise UserError(f"{str(path)!r} is not an oracle folder (needs {CONFIG} and {WEIGHTS}); train one first")
    config = json.loads((path / CONFIG).read_text())
    if list(config["shapes"]) != list(SHAPES) or list(config["colours"]) != list(COLOUR_NAMES):
        raise UserError(f"oracle {str(path)!r} was trained on another vocabulary; retrain it")
    net = OracleNet(int(config["width"]))
    net.load_state_dict(load_file(str(path / WEIGHTS)))
    return Oracle(net, config)


# ------------------------------------------------------------------------------------------------ scoring
def score_readings(readings: Sequence[SceneReading], scenes: Sequence[Scene]) -> dict[str, float]:
    """Compare readings with the scenes' labels. Appearance is read in the slot of each true object's shape
    (whatever its presence probability), so these are the oracle's accuracies given the object.

    Returns accuracies in [0, 1] plus the counts they are over (``n_images``, ``n_objects``, ``n_relations``);
    ``*_reserved`` restrict to held-out (reserved) instances, absent when there are none; ``found_<shape>``: the
    share of that shape's objects found (presence ≥ 0.5), for the shapes the scenes hold; ``colour_swapped``: over
    the objects of scenes with two or more, the share read in another object's colour of the same scene (an
    attribute-binding error rather than a wrong hue), absent when no scene has two objects.
    """
    tp = fp = fn = tn = 0
    hits: dict[str, list[float]] = {}
    found: dict[str, list[float]] = {}  # found_<shape> -> 0/1 per object of that shape
    swapped: list[float] = []  # per object of a multi-object scene: read in another object's colour

    def add(key: str, ok: bool) -> None:
        hits.setdefault(key, []).append(float(ok))

    centre_err: list[float] = []
    for reading, scene in zip(readings, scenes, strict=True):
        truth = {o.shape: o for o in scene.objects}
        for shape, r in reading.shapes.items():
            said = r.present >= 0.5
            tp, fp = tp + (said and shape in truth), fp + (said and shape not in truth)
            fn, tn = fn + (not said and shape in truth), tn + (not said and shape not in truth)
        for obj in scene.objects:
            r = reading.shapes[obj.shape]
            found.setdefault(f"found_{obj.shape}", []).append(float(r.present >= 0.5))
            for suffix in ("", "_reserved") if obj.heldout else ("",):
                add("colour" + suffix, r.colour == obj.colour)
                add("texture" + suffix, r.texture == obj.texture)
            add("size", r.size == obj.size)
            if len(scene.objects) > 1:
                others = {o.colour for o in scene.objects if o is not obj} - {obj.colour}
                swapped.append(float(r.colour in others))
            x0, y0, x1, y1 = obj.box
            centre_err.append(float(np.hypot(r.centre[0] * scene.size - (x0 + x1) / 2,
                                             r.centre[1] * scene.size - (y0 + y1) / 2)))
        for i, rel, j in scene.relations:
            add("relation", reading.relation(scene.objects[i].shape, scene.objects[j].shape) == rel)
        add("background_colour", reading.background_colour == scene.background_colour)
        add("background_kind", reading.background_kind == scene.background_kind)
        exact = set(reading.present()) == set(truth) and all(
            reading.shapes[o.shape].colour == o.colour and reading.shapes[o.shape].texture == o.texture
            for o in scene.objects
        )
        add("scene_exact", exact and reading.background_colour == scene.background_colour
            and reading.background_kind == scene.background_kind)
    precision, recall = tp / max(1, tp + fp), tp / max(1, tp + fn)
    out: dict[str, float] = {
        "n_images": len(scenes), "n_objects": len(centre_err), "n_relations": len(hits.get("relation", [])),
        "shape_presence_accuracy": (tp + tn) / max(1, tp + tn + fp + fn), "shape_precision": precision,
        "shape_recall": recall, "shape_f1": 2 * precision * recall / max(1e-9, precision + recall),
        "centre_error_px": float(np.mean(centre_err)) if centre_err else float("nan"),
    }
    out.update({f"{k}_accuracy": float(np.mean(v)) for k, v in sorted(hits.items())})
    if swapped:
        out["colour_swapped"] = float(np.mean(swapped))
    out.update({k: float(np.mean(v)) for k, v in sorted(found.items())})
    if "colour_reserved" in hits:
        out["n_objects_reserved"] = len(hits["colour_reserved"])
    return out


def oracle_accuracy(oracle: Oracle, scenes: Sequence[Scene], images: Images | None = None) -> dict[str, float]:
    """Accuracy of ``oracle`` on the renders of ``scenes`` (or on ``images`` of them, e.g. reconstructions)."""
    return score_readings(oracle.read(np.stack([s.image for s in scenes]) if images is None else images), scenes)


_TRAINING = ("train_oracle", "augment", "movq_reconstruct", "scene_targets", "oracle_loss", "Targets")


def __getattr__(name: str) -> Any:
    # the training half lives in oracle_train (it imports this module, so it is loaded on first use)
    if name in _TRAINING:
        from . import oracle_train

        return getattr(oracle_train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
