"""Recipe 3: a tiny Kandinsky-2.2-wired UNet, trained on MoVQ latents (v-prediction by default), conditioned
on the tiny CLIP's image embedding of the same scene (10% dropped to the zero-image embedding, the CFG negative).

The saved ``unet/`` + ``scheduler/`` + ``movq/`` load into ``diffusers.KandinskyV22Pipeline`` unchanged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel
from transformers import CLIPVisionModelWithProjection

from ..atomic import atomic_path, atomic_write
from ..train.core import run_training
from ..train.decoder import DecoderObjective, DecoderObjectiveConfig
from .data import ScenePool, clip_pixels, unit_pixels
from .recipe import recipe_settings

KANDINSKY22_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "set_alpha_to_one": False,  # kept for fidelity to the Hub file; from_config ignores it
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "thresholding": False,
}
"""The Kandinsky 2.2 decoder's DDPM config (variance_type defaults to fixed_small: the UNet's variance
channels are split off and ignored by the pipeline)."""


def kandinsky_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """The K2.2 decoder scheduler; ``prediction_type`` other than epsilon is a deliberate departure."""
    return DDPMScheduler.from_config({**KANDINSKY22_SCHEDULER, "prediction_type": prediction_type})


@dataclass(frozen=True)
class UNetRecipe:
    """Tiny K2.2 UNet: model shape and training schedule."""

    steps: int = 9400  # the lane time of the 2-hour build; decoder skill grows with training (docs/miniworld-notes.md)
    batch: int = 32
    lr: float = 4e-4
    warmup: int = 200
    # three levels on 16x16 latents (16 -> 8 -> 4); attention only on the two coarser ones. The full-resolution
    # level is as wide as the next: it draws the 2x2-pixel latent cells that make corners and points
    block_out_channels: tuple[int, ...] = (64, 64, 128)
    layers_per_block: int = 2
    cross_attention_dim: int = 64
    attention_head_dim: int = 32
    cond_dropout: float = 0.1
    ema_decay: float = 0.999
    snr_gamma: float = 5.0  # Min-SNR loss weighting: faster convergence for short runs
    # K2.2 ships "epsilon"; v-prediction learned colours and backgrounds far sooner here. Saved in scheduler/, and the
    # unchanged pipeline follows it
    prediction_type: str = "v_prediction"


def make_unet(recipe: UNetRecipe, embed_dim: int, latent_channels: int, latent_size: int) -> UNet2DConditionModel:
    """Wired like the K2.2 decoder UNet: image-embedding conditioning, scale-shift time embedding,
    ``out_channels = 2 × in_channels`` (ε + variance; the pipeline splits them)."""
    n = len(recipe.block_out_channels)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=2 * latent_channels,
        block_out_channels=tuple(recipe.block_out_channels), layers_per_block=recipe.layers_per_block,
        down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("SimpleCrossAttnUpBlock2D",) * (n - 1) + ("ResnetUpsampleBlock2D",),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", addition_embed_type="image",
        encoder_hid_dim_type="image_proj", encoder_hid_dim=embed_dim,
        cross_attention_dim=recipe.cross_attention_dim, attention_head_dim=recipe.attention_head_dim,
        resnet_time_scale_shift="scale_shift", norm_num_groups=32,
    )


@torch.no_grad()
def zero_image_embedding(image_encoder: CLIPVisionModelWithProjection, size: int) -> torch.Tensor:
    """``image_encoder(zeros(1, 3, S, S)).image_embeds`` (1, D): the unconditional embedding / CFG negative."""
    return image_encoder(pixel_values=torch.zeros(1, 3, size, size)).image_embeds


@torch.no_grad()
def encode_pool(
    images: np.ndarray, movq: VQModel, image_encoder: CLIPVisionModelWithProjection, batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoVQ latents (N, C, h, w) and CLIP image embeddings (N, D) of uint8 images (N, S, S, 3)."""
    lats, embs = [], []
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        lats.append(movq.encode(unit_pixels(chunk)).latents)
        embs.append(image_encoder(pixel_values=clip_pixels(chunk)).image_embeds)
    return torch.cat(lats), torch.cat(embs)


def cached_encoding(cache: Path, encode) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, embeds) stored at ``cache`` (safetensors), else ``encode()``'s, written there atomically first."""
    from safetensors.torch import load_file, save_file

    if cache.exists():
        cached = load_file(str(cache))
        return cached["latents"], cached["embeds"]
    latents, embeds = encode()
    with atomic_path(cache) as temporary:
        save_file({"latents": latents.contiguous(), "embeds": embeds.contiguous()}, str(temporary))
    return latents, embeds


def train_unet(
    latents: torch.Tensor, embeds: torch.Tensor, zero_embed: torch.Tensor, work_dir: Path, recipe: UNetRecipe,
    seed: int, export_to: Path | None = None, stop_after: int | None = None,
) -> UNet2DConditionModel:
    """Eq. 2 (:class:`~lambda_eclipse.train.decoder.DecoderObjective`) on cached (latents (N, C, h, w), embeds
    (N, D)) through the training core; resumes from ``work_dir/checkpoints``.

    Returns the UNet holding the EMA weights, which a complete run also exports (``unet/`` and ``scheduler/``)
    to ``export_to`` (default: ``work_dir``). ``stop_after`` ends the run early after that many steps, with a
    checkpoint (what a kill leaves behind).
    """
    if recipe.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be epsilon or v_prediction, not {recipe.prediction_type!r}")
    shape = (embeds.shape[1], latents.shape[1], latents.shape[-1])
    objective = DecoderObjective(
        make_unet=lambda: make_unet(recipe, *shape), scheduler=kandinsky_scheduler(recipe.prediction_type),
        latents=latents, embeds=embeds, zero_embed=zero_embed,
        config=DecoderObjectiveConfig(batch_size=recipe.batch, cond_dropout=recipe.cond_dropout,
                                      snr_gamma=recipe.snr_gamma),
        export_to=export_to or work_dir, settings={**asdict(recipe), "shape": list(shape)},
    )
    settings = recipe_settings("unet", work_dir, recipe.steps, seed, recipe.lr, recipe.warmup,
                               ema_decay=recipe.ema_decay)
    return run_training(objective, settings, stop_after).model.eval()


@torch.no_grad()
def verify_decoder(
    unet: UNet2DConditionModel, movq: VQModel, image_encoder: CLIPVisionModelWithProjection, images: np.ndarray,
    size: int, steps: int = 50, guidance: float = 4.0, seed: int = 0, scheduler: DDPMScheduler | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    """Render ``images`` (N, S, S, 3) back from their CLIP embeddings through the unchanged
    KandinskyV22Pipeline (the package's one decoding function) and score it: the share of renders whose CLIP
    embedding is nearest to their own source among the N (chance 1/N). Returns (metrics, generated uint8 (N, S, S, 3))."""
    from ..decoding import decode_image_embeds

    emb = image_encoder(pixel_values=clip_pixels(images)).image_embeds
    neg = zero_image_embedding(image_encoder, size).expand_as(emb)
    out = decode_image_embeds(unet, scheduler or kandinsky_scheduler(), movq, emb, neg, size, size, steps, guidance,
                              torch.Generator().manual_seed(seed), "np")
    gen = np.round(out * 255).astype(np.uint8)
    gen_emb = F.normalize(image_encoder(pixel_values=clip_pixels(gen)).image_embeds, dim=-1)
    sims = gen_emb @ F.normalize(emb, dim=-1).T
    top1 = sims.argmax(1).eq(torch.arange(len(images))).float().mean().item()
    mse = ((gen.astype(np.float32) - images.astype(np.float32)) / 127.5).__pow__(2).mean().item()
    return {"render_retrieval_top1": top1, "render_pixel_mse": mse, "n": len(images), "steps": steps}, gen


def run_unet_stage(pool: ScenePool, heldout: ScenePool, work_dir: Path, components: Path, recipe: UNetRecipe,
                   seed: int, size: int, verify_n: int = 64, verify_steps: int = 50) -> dict[str, float]:
    """Encode the pool (cached), train, export ``unet/`` and ``scheduler/``, verify through the pipeline."""
    from PIL import Image

    work_dir = Path(work_dir)
    movq = VQModel.from_pretrained(Path(components) / "movq").eval()
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(Path(components) / "image_encoder").eval()
    latents, embeds = cached_encoding(work_dir / "encoded.safetensors",
                                      lambda: encode_pool(pool.images, movq, image_encoder))
    zero = zero_image_embedding(image_encoder, size)
    unet = train_unet(latents, embeds, zero, work_dir, recipe, seed, export_to=Path(components))
    images = heldout.images[:verify_n]
    metrics, rows = {}, [np.concatenate(list(images[:16]), 1)]
    for guidance in (1.0, 4.0):
        m, gen = verify_decoder(
            unet, movq, image_encoder, images, size, steps=verify_steps, guidance=guidance, seed=seed,
            scheduler=kandinsky_scheduler(recipe.prediction_type),
        )
        metrics.update({f"{k}_guidance{guidance:g}": v for k, v in m.items() if k.startswith("render")})
        metrics.update(n=m["n"], steps=m["steps"])
        rows.append(np.concatenate(list(gen[:16]), 1))
    # top row: held-out sources; then renders at guidance 1 and 4
    with atomic_path(work_dir / "samples.png") as temporary:
        Image.fromarray(np.concatenate(rows, 0)).save(temporary, format="PNG")
    atomic_write(work_dir / "metrics.json", json.dumps({"recipe": asdict(recipe), **metrics}, indent=2))
    return metrics


@dataclass(frozen=True)
class ColourRecipe:
    """Continued training of a built UNet on scenes whose objects also take off-palette colours.

    The main recipe's scenes use 8 object colours only, so the decoder had never drawn a colour between two of
    them: decoding the CLIP embeddings of an RGB ramp lost the object or jumped from one colour to the other, and
    interpolated embeddings did the same (docs/miniworld-notes.md, "Colour continuum"). The CLIP encoder is
    already smooth along such ramps, so only the decoder is taught them.
    """

    steps: int = 2000
    batch: int = 32
    lr: float = 1e-4  # a quarter of the main recipe's peak: the skills it learned are kept, not relearned
    warmup: int = 50
    colour_mix: float = 0.5  # half the objects off-palette, half on it (palette colours stay as they were)
    scenes: int = 20000  # scenes of the build's training stream (same layouts), rendered with colour_mix
    # Scenes (the stream's next ones) in which one object goes from its colour A to another palette colour B: the
    # condition is slerp(CLIP(scene in A), CLIP(scene in B), t), the image the scene painted (1-t)·A + t·B. The tiny
    # CLIP's embedding of a mixed colour lies off the A-B arc, so without these the decoder, given an embedding on
    # the arc (what interpolation makes), still jumps from A to B (docs/miniworld-notes.md, "Colour continuum")
    pairs: int = 5000
    ema_decay: float = 0.999


@torch.no_grad()
def encode_colour_pairs(n: int, seed: int, size: int, start: int, movq: VQModel,
                        image_encoder: CLIPVisionModelWithProjection, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` colour-pair samples (see ``ColourRecipe.pairs``) of training scenes ``start ..``: MoVQ latents of the
    mixed-colour renders (n, C, h, w) and their conditions, slerps between the two ends' CLIP embeddings (n, D)."""
    from ..interpolation import slerp
    from .scenes import render_scene, scene_seed
    from .vocab import COLOURS

    lats, conds = [], []
    for first in range(0, n, batch):
        ends_a, ends_b, mixed, weights = [], [], [], []
        for k in range(first, min(n, first + batch)):
            scene_id = scene_seed(seed, start + k)
            scene = render_scene(scene_id, size)
            rng = np.random.default_rng([seed, start + k, 23])
            i = int(rng.integers(len(scene.objects)))
            a = scene.objects[i].colour
            b = [c for c in COLOURS if c != a][int(rng.integers(len(COLOURS) - 1))]
            t = float(rng.random())
            rgb = tuple(float(v) for v in (1 - t) * np.asarray(COLOURS[a], float) + t * np.asarray(COLOURS[b], float))
            ends_a.append(scene.image)
            ends_b.append(render_scene(scene_id, size, recolour={i: b}).image)
            mixed.append(render_scene(scene_id, size, recolour={i: rgb}).image)
            weights.append(t)
        emb_a = image_encoder(pixel_values=clip_pixels(np.stack(ends_a))).image_embeds
        emb_b = image_encoder(pixel_values=clip_pixels(np.stack(ends_b))).image_embeds
        conds.append(slerp(emb_a, emb_b, torch.tensor(weights)[:, None]))
        lats.append(movq.encode(unit_pixels(np.stack(mixed))).latents)
    return torch.cat(lats), torch.cat(conds)


def run_colour_stage(components: Path, work_dir: Path, recipe: ColourRecipe, unet_recipe: UNetRecipe, seed: int,
                     size: int, stop_after: int | None = None, half: bool = False) -> dict[str, float]:
    """Continue ``components/unet`` on colour-mixed scenes (cached encodings, resumable in ``work_dir``) and write
    it back to ``components/unet`` atomically (in float16 if ``half``: the shipped bundle's storage). ``components``
    is a build's components folder or a bundle folder: both hold ``unet/``, ``movq/`` and ``image_encoder/``."""
    from ..atomic import atomic_dir
    from .data import render_pool

    if recipe.steps == 0:
        return {"steps": 0, "complete": True}  # the stage is off
    components, work_dir = Path(components), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    movq = VQModel.from_pretrained(components / "movq").eval()
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(components / "image_encoder").eval()
    def encode() -> tuple[torch.Tensor, torch.Tensor]:
        pool = render_pool(recipe.scenes, seed, size, "train", colour_mix=recipe.colour_mix)
        latents, embeds = encode_pool(pool.images, movq, image_encoder)
        if recipe.pairs:
            pair_latents, pair_embeds = encode_colour_pairs(recipe.pairs, seed, size, recipe.scenes, movq, image_encoder)
            latents, embeds = torch.cat([latents, pair_latents]), torch.cat([embeds, pair_embeds])
        return latents, embeds

    latents, embeds = cached_encoding(work_dir / "encoded.safetensors", encode)
    start = components / "unet"
    objective = DecoderObjective(
        make_unet=lambda: UNet2DConditionModel.from_pretrained(start, torch_dtype=torch.float32),
        scheduler=kandinsky_scheduler(unet_recipe.prediction_type), latents=latents, embeds=embeds,
        zero_embed=zero_image_embedding(image_encoder, size),
        config=DecoderObjectiveConfig(batch_size=recipe.batch, cond_dropout=unet_recipe.cond_dropout,
                                      snr_gamma=unet_recipe.snr_gamma),
        export_to=work_dir / "export", settings={**asdict(recipe), "continues": "unet"},
    )
    settings = recipe_settings("unet-colour", work_dir, recipe.steps, seed, recipe.lr, recipe.warmup,
                               ema_decay=recipe.ema_decay)
    run = run_training(objective, settings, stop_after)
    if not run.complete:
        return {"steps": run.step, "complete": False}
    unet = run.model.eval()
    with atomic_dir(start) as temporary:  # the continued UNet replaces the one it started from, whole or not at all
        (unet.half() if half else unet).save_pretrained(temporary)
    metrics = {"steps": recipe.steps, "scenes": recipe.scenes, "colour_mix": recipe.colour_mix, "pairs": recipe.pairs,
               "complete": True}
    atomic_write(work_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics
