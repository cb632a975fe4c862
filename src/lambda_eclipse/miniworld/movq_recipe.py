"""Recipe 2: a tiny MoVQ (diffusers ``VQModel`` with spatial norm), trained as an autoencoder.

Kandinsky 2.2 decodes the UNet's *unquantized* latents with ``movq.decode(latents, force_not_quantize=True)``
and no scaling factor, so the decoder is trained on unquantized latents and, after training, a per-channel
affine map that makes latents zero-mean and unit-variance is folded exactly into the weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import VQModel
from diffusers.models.attention_processor import SpatialNorm

from ..atomic import atomic_dir, atomic_write
from ..train.checkpoint import RunState
from ..train.core import require_same, run_training
from .data import ScenePool, unit_pixels
from .recipe import recipe_settings


@dataclass(frozen=True)
class MoVQRecipe:
    """Tiny MoVQ: model shape and training schedule."""

    steps: int = 1500
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 50
    # 2 levels = factor 2 (32 px -> 16x16x4 latents): factor 4 turned objects into blobs. Widths are multiples of
    # 32: SpatialNorm hard-codes GroupNorm(32) in the decoder
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    num_vq_embeddings: int = 256
    edge_weight: float = 0.5  # L1 on image gradients keeps silhouettes sharp
    latent_l2: float = 1e-4  # keeps the latent scale from drifting
    latent_noise: float = 0.0  # optional noise on latents while decoding (relative std); off: it blurred objects
    object_weight: float = 1.0  # extra loss weight on object pixels: objects are small but matter most


def make_movq(recipe: MoVQRecipe) -> VQModel:
    n = len(recipe.block_out_channels)
    return VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(recipe.block_out_channels),
        layers_per_block=recipe.layers_per_block, latent_channels=recipe.latent_channels,
        num_vq_embeddings=recipe.num_vq_embeddings, vq_embed_dim=recipe.latent_channels, norm_type="spatial",
    )


def _grad_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between the finite-difference image gradients of a and b, both (B, 3, H, W)."""
    dx = lambda x: x[..., :, 1:] - x[..., :, :-1]
    dy = lambda x: x[..., 1:, :] - x[..., :-1, :]
    return (dx(a) - dx(b)).abs().mean() + (dy(a) - dy(b)).abs().mean()


class MoVQObjective:
    """The tiny MoVQ's autoencoder loss for the training core: L1 + L2 reconstruction (object pixels weighted up),
    L1 on image gradients (sharp silhouettes) and a small latent L2 (keeps the latent scale from drifting)."""

    def __init__(self, pool: ScenePool, recipe: MoVQRecipe) -> None:
        self.pool, self.recipe = pool, recipe

    def config_dict(self) -> dict:
        return {"movq": asdict(self.recipe)}

    def check_resume(self, saved: dict, output_dir: Path) -> None:
        require_same(saved, self.config_dict(), ("movq",), output_dir)

    def build_model(self) -> VQModel:
        return make_movq(self.recipe)

    def batches(self, state: RunState, accelerator):
        r, pool, g = self.recipe, self.pool, state.generator
        while True:
            idx = torch.randint(len(pool), (r.batch,), generator=g).numpy()
            x = unit_pixels(pool.images[idx])
            w = 1.0 + r.object_weight * torch.tensor(pool.object_masks[idx], dtype=torch.float32)[:, None]
            flip = torch.rand(r.batch, generator=g) < 0.5  # flips are free extra data for an autoencoder
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            w = torch.where(flip[:, None, None, None], w.flip(-1), w) / w.mean()
            yield {"pixels": x.to(accelerator.device), "weights": w.to(accelerator.device)}

    def losses(self, model, batch, state: RunState) -> dict[str, torch.Tensor]:
        r, x, w = self.recipe, batch["pixels"], batch["weights"]
        h = model.encode(x).latents
        noise = torch.randn(h.shape, generator=state.generator).to(h) * r.latent_noise * h.detach().std()
        y = model.decode(h + noise, force_not_quantize=True).sample
        err = y - x
        reconstruction = (w * (err.abs() + err.pow(2))).mean()
        loss = reconstruction + r.edge_weight * _grad_l1(y, x) + r.latent_l2 * h.pow(2).mean()
        return {"loss": loss, "reconstruction": reconstruction.detach()}

    def validate(self, model, accelerator) -> None:
        return None

    def export(self, model, output_dir: Path) -> None:
        return None  # the stage folds the latent normalisation in first (:func:`run_movq_stage`)


def train_movq(
    pool: ScenePool, work_dir: Path, recipe: MoVQRecipe, seed: int, stop_after: int | None = None
) -> VQModel:
    """Train (resuming from ``work_dir/checkpoints``) and return the model (latents not yet normalised).

    ``stop_after`` ends the run early after that many steps, with a checkpoint (what a kill leaves behind).
    """
    settings = recipe_settings("movq", work_dir, recipe.steps, seed, recipe.lr, recipe.warmup)
    return run_training(MoVQObjective(pool, recipe), settings, stop_after).model.eval()


@torch.no_grad()
def latent_stats(movq: VQModel, images, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (C,) of ``movq.encode`` over uint8 images (N, S, S, 3)."""
    lat = torch.cat([movq.encode(unit_pixels(images[i : i + batch])).latents for i in range(0, len(images), batch)])
    return lat.mean(dim=(0, 2, 3)), lat.std(dim=(0, 2, 3))


@torch.no_grad()
def fold_latent_normalisation(movq: VQModel, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Rewrite ``movq`` in place so its latents become ``(h - mean) / std`` per channel while every
    decode is unchanged (exact up to float rounding).

    quant_conv's output is divided out; every 1×1 consumer of the latent — post_quant_conv and each
    SpatialNorm's conv_y/conv_b — gets ``W·diag(std)`` and ``b + W·mean``; the codebook moves with it.
    """
    q = movq.quant_conv
    q.weight.div_(std.view(-1, 1, 1, 1))
    q.bias.sub_(mean).div_(std)
    consumers = [movq.post_quant_conv]
    for module in movq.decoder.modules():
        if isinstance(module, SpatialNorm):
            consumers += [module.conv_y, module.conv_b]
    for conv in consumers:
        w = conv.weight[:, :, 0, 0]  # (out, C): all consumers are 1x1, so the fold is exact at borders too
        conv.bias.add_(w @ mean)
        conv.weight.mul_(std.view(1, -1, 1, 1))
    emb = movq.quantize.embedding.weight
    emb.sub_(mean).div_(std)


@torch.no_grad()
def evaluate_movq(movq: VQModel, images, masks=None, batch: int = 256) -> dict[str, float]:
    """Reconstruction MSE in [-1, 1] through the K2.2 path (encode, decode unquantized); with ``masks``
    (N, S, S) also the MSE over object pixels only."""
    sq = []
    for i in range(0, len(images), batch):
        x = unit_pixels(images[i : i + batch])
        y = movq.decode(movq.encode(x).latents, force_not_quantize=True).sample.clamp(-1, 1)
        sq.append((y - x).pow(2).mean(dim=1))  # (B, S, S)
    sq = torch.cat(sq)
    out = {"recon_mse": sq.mean().item(), "n": len(images)}
    if masks is not None:
        out["recon_mse_objects"] = sq[torch.as_tensor(np.asarray(masks))].mean().item()
    return out


def run_movq_stage(pool: ScenePool, heldout: ScenePool, work_dir: Path, components: Path, recipe: MoVQRecipe,
                   seed: int) -> dict[str, float]:
    """Train, normalise the latents, evaluate on held-out scenes, export ``components/movq``."""
    movq = train_movq(pool, work_dir, recipe, seed)
    mean, std = latent_stats(movq, pool.images[:2048])
    probe = unit_pixels(heldout.images[:16])
    before = movq.decode(movq.encode(probe).latents, force_not_quantize=True).sample
    fold_latent_normalisation(movq, mean, std)
    after_lat = movq.encode(probe).latents
    after = movq.decode(after_lat, force_not_quantize=True).sample
    metrics = evaluate_movq(movq, heldout.images, heldout.object_masks)
    metrics["fold_max_abs_error"] = (after - before).abs().max().item()
    new_mean, new_std = latent_stats(movq, pool.images[:2048])
    metrics["latent_mean_after"] = new_mean.tolist()
    metrics["latent_std_after"] = new_std.tolist()
    metrics["raw_latent_std"] = std.tolist()
    atomic_write(Path(work_dir) / "metrics.json", json.dumps({"recipe": asdict(recipe), **metrics}, indent=2))
    with atomic_dir(Path(components) / "movq") as tmp:
        movq.save_pretrained(tmp)
    return metrics
