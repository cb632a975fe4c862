"""The concept oracle: a small CNN that reads a miniature-world image back into labels (ConceptBed-style judge).

For every shape category it predicts presence, colour, texture, size and the object's centre; for the scene, the
background colour and kind. The per-shape heads make multi-object scenes unambiguous: a scene never holds two
objects of the same shape (``render_scene`` draws shapes without replacement), so "the ball's colour" is
well defined. Should that ever change, the target of a shape is its largest instance (:func:`scene_targets`).

Each shape has its own spatial attention over the feature map: the centre is the attention's soft-argmax and the
colour/texture/size heads read the attention-pooled features, so they describe *that* object, not the scene.

Training (:func:`train_oracle`) renders train-split scenes, optionally adds their MoVQ reconstructions (what a
decoder produces looks like them), and augments with blur, noise and a light colour jitter that keeps every colour
name, because generated images are blurrier and noisier than renders.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .scenes import Scene, render_scene, scene_seed
from .vocab import BG_COLOURS, BG_KINDS, COLOURS, SHAPES, SIZES, TEXTURES

COLOUR_NAMES, BG_COLOUR_NAMES = tuple(COLOURS), tuple(BG_COLOURS)
K, NC, NT, NS = len(SHAPES), len(COLOURS), len(TEXTURES), len(SIZES)
_PER_SHAPE = 1 + NC + NT + NS  # presence logit, colour, texture and size logits of one shape
WEIGHTS, CONFIG = "model.safetensors", "oracle.json"
Images = Union[Sequence[Image.Image], torch.Tensor, np.ndarray]


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
        n, c, h, w = f.shape
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


# ------------------------------------------------------------------------------------------------ targets
@dataclass
class Targets:
    """Training targets of N scenes (absent shapes: class -1, centre 0)."""

    images: np.ndarray  # (N, S, S, 3) uint8
    presence: torch.Tensor  # (N, K) float 0/1
    colour: torch.Tensor  # (N, K) long
    texture: torch.Tensor  # (N, K) long
    size: torch.Tensor  # (N, K) long
    centre: torch.Tensor  # (N, K, 2) float, (x, y) fractions
    bg_colour: torch.Tensor  # (N,) long
    bg_kind: torch.Tensor  # (N,) long


def scene_targets(scenes: Sequence[Scene]) -> Targets:
    """Per-shape targets; if a shape ever occurred twice, its target would be the instance with the largest mask."""
    n = len(scenes)
    presence = torch.zeros(n, K)
    colour, texture, size = (torch.full((n, K), -1, dtype=torch.long) for _ in range(3))
    centre = torch.zeros(n, K, 2)
    area = torch.zeros(n, K)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            k = SHAPES.index(obj.shape)
            a = float(obj.mask.sum())
            if presence[i, k] and area[i, k] >= a:
                continue
            presence[i, k], area[i, k] = 1.0, a
            colour[i, k], texture[i, k] = COLOUR_NAMES.index(obj.colour), TEXTURES.index(obj.texture)
            size[i, k] = SIZES.index(obj.size)
            x0, y0, x1, y1 = obj.box
            centre[i, k] = torch.tensor([(x0 + x1) / 2 / scene.size, (y0 + y1) / 2 / scene.size])
    return Targets(
        np.stack([s.image for s in scenes]), presence, colour, texture, size, centre,
        torch.tensor([BG_COLOUR_NAMES.index(s.background_colour) for s in scenes]),
        torch.tensor([BG_KINDS.index(s.background_kind) for s in scenes]),
    )


def oracle_loss(out: dict[str, torch.Tensor], t: Targets, idx: torch.Tensor) -> torch.Tensor:
    """Presence BCE + appearance CE on present shapes + L1 centre on present shapes + background CE."""
    present = t.presence[idx]
    mask = present.bool()
    loss = F.binary_cross_entropy_with_logits(out["presence"], present)
    for key, target in (("colour", t.colour), ("texture", t.texture), ("size", t.size)):
        loss = loss + F.cross_entropy(out[key][mask], target[idx][mask])
    loss = loss + 10.0 * F.l1_loss(out["centre"][mask], t.centre[idx][mask])  # ×10: fractions are small numbers
    loss = loss + F.cross_entropy(out["bg_colour"], t.bg_colour[idx]) + F.cross_entropy(out["bg_kind"], t.bg_kind[idx])
    return loss


# ------------------------------------------------------------------------------------------------ scoring
def score_readings(readings: Sequence[SceneReading], scenes: Sequence[Scene]) -> dict[str, float]:
    """Compare readings with the scenes' labels. Appearance is read in the slot of each true object's shape
    (whatever its presence probability), so these are the oracle's accuracies given the object.

    Returns accuracies in [0, 1] plus the counts they are over (``n_images``, ``n_objects``, ``n_relations``);
    ``*_reserved`` restrict to held-out (reserved) instances, absent when there are none.
    """
    tp = fp = fn = tn = 0
    hits: dict[str, list[float]] = {}

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
            for suffix in ("", "_reserved") if obj.heldout else ("",):
                add("colour" + suffix, r.colour == obj.colour)
                add("texture" + suffix, r.texture == obj.texture)
            add("size", r.size == obj.size)
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
    if "colour_reserved" in hits:
        out["n_objects_reserved"] = len(hits["colour_reserved"])
    return out


def oracle_accuracy(oracle: Oracle, scenes: Sequence[Scene], images: Images | None = None) -> dict[str, float]:
    """Accuracy of ``oracle`` on the renders of ``scenes`` (or on ``images`` of them, e.g. reconstructions)."""
    return score_readings(oracle.read(np.stack([s.image for s in scenes]) if images is None else images), scenes)


# ------------------------------------------------------------------------------------------------ training
def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur (half the batch, σ 0.3–1.1 px), brightness/per-channel gain ±6%/±3%, offset ±0.03 and noise σ ≤ 0.04.

    The jitter is far smaller than the gaps between any two colours of the palette, so every name survives.
    x: (B, 3, S, S) in [0, 1] -> (B, 3, S, S) in [0, 1].
    """
    b, c, h, w = x.shape
    sigma = torch.rand(b, generator=g) * 0.8 + 0.3
    taps = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*3, 5): one kernel per image, all channels
    y = F.pad(x.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="replicate")
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    y = F.conv2d(y, k[:, None, None, :], groups=b * c).view(b, c, h, w)
    x = torch.where((torch.rand(b, generator=g) < 0.5).view(b, 1, 1, 1), y, x)
    gain = (1 + (torch.rand(b, 1, 1, 1, generator=g) - 0.5) * 0.12) * (1 + (torch.rand(b, c, 1, 1, generator=g) - 0.5) * 0.06)
    offset = (torch.rand(b, 1, 1, 1, generator=g) - 0.5) * 0.06
    noise = torch.randn(x.shape, generator=g) * torch.rand(b, 1, 1, 1, generator=g) * 0.04
    return (x * gain + offset + noise).clamp(0, 1)


@torch.no_grad()
def movq_reconstruct(images: np.ndarray, movq_dir: str | os.PathLike, batch: int = 128) -> np.ndarray:
    """uint8 (N, S, S, 3) -> their MoVQ round trips, decoded the way KandinskyV22Pipeline decodes (unquantized)."""
    from diffusers import VQModel

    movq = VQModel.from_pretrained(str(movq_dir)).eval()
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = movq.decode(movq.encode(x).latents, force_not_quantize=True).sample
        out.append(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def _render(n: int, stream: int, size: int, split: str) -> list[Scene]:
    return [render_scene(scene_seed(stream, i), size, split) for i in range(n)]  # type: ignore[arg-type]


def train_oracle(
    out_dir: str | os.PathLike, size: int = 32, steps: int = 3000, batch: int = 64, seed: int = 0, threads: int = 1,
    scenes: int = 20000, width: int = 24, lr: float = 2e-3, movq_dir: str | os.PathLike | None = None,
    reserved_share: float = 0.25, eval_scenes: int = 1000, log_every: int = 250,
) -> Path:
    """Train an oracle and write ``out_dir/{model.safetensors, oracle.json}`` (each atomically, config last).

    ``scenes`` scenes are rendered once: ``reserved_share`` of them from the held-out split (a seed stream the
    evaluation never uses) so the judge has seen the reserved colour × texture × shape combinations it must judge;
    the generator under test never trains on them, so this leaks nothing. With ``movq_dir`` every scene also gets
    its MoVQ reconstruction and each training sample uses one of the two at random. Seeded and step-bounded;
    ``oracle.json`` holds the held-out accuracy on ``eval_scenes`` renders (and reconstructions).
    """
    from safetensors.torch import save_file

    from .training import cosine_lr, set_lr, set_threads, step_generator

    set_threads(threads)
    torch.manual_seed(seed)
    start = time.monotonic()
    n_res = int(scenes * reserved_share)
    pool = _render(scenes - n_res, 9000 + seed, size, "train") + _render(n_res, 9100 + seed, size, "heldout")
    t = scene_targets(pool)
    clean = torch.from_numpy(t.images).permute(0, 3, 1, 2).contiguous()  # uint8, converted per batch
    recon = None
    if movq_dir is not None:
        recon = torch.from_numpy(movq_reconstruct(t.images, movq_dir)).permute(0, 3, 1, 2).contiguous()
    prep_s = time.monotonic() - start
    net = OracleNet(width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    net.train()
    for step in range(steps):
        g = step_generator(seed, step, stream=11)
        idx = torch.randint(len(pool), (batch,), generator=g)
        x = clean[idx]
        if recon is not None:
            x = torch.where((torch.rand(batch, generator=g) < 0.5).view(-1, 1, 1, 1), recon[idx], x)
        x = augment(x.float() / 255.0, g)
        set_lr(opt, cosine_lr(step, steps, lr, warmup=min(100, steps // 10 + 1)))
        loss = oracle_loss(net(x), t, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"oracle step {step + 1}/{steps} loss {loss.item():.4f} {time.monotonic() - start:.0f}s", flush=True)
    net.eval()
    config = {
        "size": size, "width": width, "shapes": list(SHAPES), "colours": list(COLOUR_NAMES),
        "textures": list(TEXTURES), "sizes": list(SIZES), "bg_colours": list(BG_COLOUR_NAMES),
        "bg_kinds": list(BG_KINDS), "parameters": sum(p.numel() for p in net.parameters()),
        "train": {"steps": steps, "batch": batch, "seed": seed, "scenes": scenes, "lr": lr,
                  "reserved_share": reserved_share, "movq": None if movq_dir is None else str(movq_dir),
                  "prep_seconds": round(prep_s, 1), "seconds": round(time.monotonic() - start, 1)},
    }
    metrics: dict[str, dict] = {}
    if eval_scenes:
        held = _render(eval_scenes, 9200 + seed, size, "heldout")  # the eval harness uses streams < 9000
        oracle = Oracle(net, config)
        metrics["heldout_renders"] = oracle_accuracy(oracle, held)
        if movq_dir is not None:
            images = movq_reconstruct(np.stack([s.image for s in held]), movq_dir)
            metrics["heldout_movq_reconstructions"] = oracle_accuracy(oracle, held, images)
    config["metrics"] = metrics
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / f".tmp-{tag}-{WEIGHTS}"))
    os.replace(out / f".tmp-{tag}-{WEIGHTS}", out / WEIGHTS)
    (out / f".tmp-{tag}-{CONFIG}").write_text(json.dumps(config, indent=2))
    os.replace(out / f".tmp-{tag}-{CONFIG}", out / CONFIG)  # written last: its presence means the folder is whole
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m lambda_eclipse.miniworld.oracle --out runs/miniworld-oracle [--steps N] [--movq DIR]``."""
    import argparse

    p = argparse.ArgumentParser(description="train the miniature-world concept oracle")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--scenes", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--movq", help="MoVQ folder: also train on its reconstructions")
    a = p.parse_args(argv)
    out = train_oracle(a.out, a.size, a.steps, a.batch, a.seed, a.threads, a.scenes, movq_dir=a.movq)
    print(json.dumps(json.loads((out / CONFIG).read_text())["metrics"], indent=2))


if __name__ == "__main__":
    main()
