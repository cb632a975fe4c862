"""Training of the concept oracle (:mod:`lambda_eclipse.miniworld.oracle`): targets, loss, augmentation, and the
objective that the training core runs (`lambda-eclipse miniworld build` trains it as one of its stages)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_path, atomic_write
from ..train.checkpoint import RunState
from ..train.core import require_same, run_training
from .oracle import BG_COLOUR_NAMES, COLOUR_NAMES, CONFIG, WEIGHTS, K, Oracle, OracleNet, oracle_accuracy
from .recipe import recipe_settings
from .scenes import Scene, render_scene, scene_seed
from .vocab import BG_KINDS, SHAPES, SIZES, TEXTURES


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


# ------------------------------------------------------------------------------------------------ training
def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur (half the batch, σ 0.3–0.8 px: more would erase the 2 px textures), brightness/per-channel gain ±6%/±3%, offset ±0.03 and noise σ ≤ 0.04.

    The jitter is far smaller than the gaps between any two colours of the palette, so every name survives.
    x: (B, 3, S, S) in [0, 1] -> (B, 3, S, S) in [0, 1].
    """
    b, c, h, w = x.shape
    sigma = torch.rand(b, generator=g) * 0.5 + 0.3
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


def weights_fingerprint(folder: str | os.PathLike | None) -> str | None:
    """First 16 hex digits of the SHA-256 of a model folder's weights: shows when the MoVQ was retrained since."""
    import hashlib

    if folder is None:
        return None
    digest = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def _render(n: int, stream: int, size: int, split: str) -> list[Scene]:
    return [render_scene(scene_seed(stream, i), size, split) for i in range(n)]  # type: ignore[arg-type]


class OracleObjective:
    """The oracle's loss for the training core: each batch mixes renders with their MoVQ reconstructions (when
    given) and is augmented (:func:`augment`), so the judge reads generated images like renders."""

    def __init__(self, targets: Targets, recon: torch.Tensor | None, batch: int, width: int, run: dict) -> None:
        self.targets, self.recon, self.batch, self.width, self.run = targets, recon, batch, width, run
        self.clean = torch.from_numpy(targets.images).permute(0, 3, 1, 2).contiguous()  # uint8, converted per batch

    def config_dict(self) -> dict:
        return {"oracle": self.run}

    def check_resume(self, saved: dict, output_dir: Path) -> None:
        require_same(saved, self.config_dict(), ("oracle",), output_dir)

    def build_model(self) -> OracleNet:
        return OracleNet(self.width)

    def batches(self, state: RunState, accelerator):
        g = state.generator
        while True:
            idx = torch.randint(len(self.clean), (self.batch,), generator=g)
            x = self.clean[idx]
            if self.recon is not None:
                x = torch.where((torch.rand(self.batch, generator=g) < 0.5).view(-1, 1, 1, 1), self.recon[idx], x)
            yield {"index": idx, "images": augment(x.float() / 255.0, g).to(accelerator.device)}

    def losses(self, model, batch, state: RunState) -> dict[str, torch.Tensor]:
        return {"loss": oracle_loss(model(batch["images"]), self.targets, batch["index"])}

    def validate(self, model, accelerator) -> None:
        return None

    def export(self, model, output_dir: Path) -> None:
        return None  # the release folder is written with its held-out accuracy (:func:`train_oracle`)


def train_oracle(
    out_dir: str | os.PathLike, size: int = 32, steps: int = 6000, batch: int = 64, seed: int = 0,
    scenes: int = 30000, width: int = 24, lr: float = 2e-3, movq_dir: str | os.PathLike | None = None,
    reserved_share: float = 0.25, eval_scenes: int = 1000, checkpoint_every: int = 500,
    stop_after: int | None = None, work_dir: str | os.PathLike | None = None,
) -> Path:
    """Train an oracle and write ``out_dir/{model.safetensors, oracle.json}`` (each atomically, config last).

    ``scenes`` scenes are rendered once: ``reserved_share`` of them from the held-out split (a seed stream the
    evaluation never uses) so the judge has seen the reserved colour × texture × shape combinations it must judge;
    the generator under test never trains on them, so this leaks nothing. With ``movq_dir`` every scene also gets
    its MoVQ reconstruction and each training sample uses one of the two at random. Seeded and step-bounded;
    ``oracle.json`` holds the held-out accuracy on ``eval_scenes`` renders (and reconstructions). Training runs in
    ``work_dir`` (default: ``OUT-run`` beside ``out_dir``, so the release folder holds only the release), and a
    killed run resumes from its checkpoints there (the pool re-renders identically); ``stop_after`` ends a run
    early after that many steps with only the checkpoint written (what a kill leaves).
    """
    from safetensors.torch import save_file

    start = time.monotonic()
    out = Path(out_dir)
    n_res = int(scenes * reserved_share)
    pool = _render(scenes - n_res, 9000 + seed, size, "train") + _render(n_res, 9100 + seed, size, "heldout")
    t = scene_targets(pool)
    recon = None
    if movq_dir is not None:
        recon = torch.from_numpy(movq_reconstruct(t.images, movq_dir)).permute(0, 3, 1, 2).contiguous()
    prep_s = time.monotonic() - start
    run_config = {"size": size, "steps": steps, "batch": batch, "seed": seed, "scenes": scenes, "width": width,
                  "lr": lr, "reserved_share": reserved_share, "movq": None if movq_dir is None else str(movq_dir)}
    settings = recipe_settings("oracle", work_dir or out.with_name(f"{out.name}-run"), steps, seed, lr,
                               warmup=min(100, steps // 10 + 1), weight_decay=1e-4, max_grad_norm=0.0,
                               checkpoint_every=checkpoint_every)
    run = run_training(OracleObjective(t, recon, batch, width, run_config), settings, stop_after)
    if not run.complete:
        return out
    net = run.model.eval()
    config = {
        "size": size, "width": width, "shapes": list(SHAPES), "colours": list(COLOUR_NAMES),
        "textures": list(TEXTURES), "sizes": list(SIZES), "bg_colours": list(BG_COLOUR_NAMES),
        "bg_kinds": list(BG_KINDS), "parameters": sum(p.numel() for p in net.parameters()),
        "train": {**{k: v for k, v in run_config.items() if k != "width"}, "movq_sha256": weights_fingerprint(movq_dir),
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
    with atomic_path(out / WEIGHTS) as temporary:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(temporary))
    atomic_write(out / CONFIG, json.dumps(config, indent=2))  # written last: its presence means the folder is whole
    return out
