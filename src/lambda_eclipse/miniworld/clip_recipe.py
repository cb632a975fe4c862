"""Recipe 1: a tiny CLIP, trained contrastively on scenes and subject crops, saved as K2.2-style components.

Batches mix scene images with their captions (both kinds) and subject crops with "a {colour} {texture}
{shape}", so a crop's embedding means its appearance — what the prior needs for the λ binding.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from .data import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ScenePool,
    clip_pixels,
    off_palette_crops,
    patch_colour_labels,
    patch_shape_labels,
    shape_cell_labels,
    shape_labels,
    tokenize,
)
from ..atomic import atomic_dir, atomic_write
from ..losses import clip_loss
from ..train.checkpoint import RunState
from ..train.core import LoopSettings, require_same, run_training
from .recipe import recipe_settings
from .vocab import SHAPES, miniworld_tokenizer

POSITION_GRID = 4  # cells per side of the position head's grid
CLIP_COMPONENTS = ("text_encoder", "image_encoder", "tokenizer", "image_processor")


@dataclass(frozen=True)
class ClipRecipe:
    """Tiny CLIP: model shape and training schedule (what each option measured: docs/miniworld-notes.md)."""

    steps: int = 2500
    batch_scenes: int = 96  # scene images per batch
    batch_crops: int = 48  # subject crops per batch
    p_full: float = 0.7  # chance a scene is paired with its full caption (else the appearance-free one)
    # The decoder reads only the image embedding, so it must carry each object's shape; plain contrastive training
    # left it nearly blind to shapes. The four options below are the fix, each a switch so its effect stays measurable.
    same_background: float = 0.5  # share of a batch from one background: those negatives differ only in objects
    shape_negatives: bool = True  # the full caption with one shape word changed is an extra negative
    shape_loss: float = 1.0  # a linear head (not exported) must read the shapes from the raw image embedding
    patch_shape_loss: float = 1.0  # a per-patch head (not exported) must name the shape under each patch token
    position_loss: float = 0.0  # a head must say where each shape is (4x4 grid); off: measured no gain
    # Heads (not exported) that must read the painted RGB of each shape from the raw embedding (scenes and crops)
    # and of each patch from its token: colour becomes a linear, continuous quantity of the embedding rather than
    # 8 categories, so in-between colours lie between their ends (interpolation, issue 13). MSE on RGB in [0, 1].
    colour_loss: float = 0.0
    init_from: str = ""  # a components folder whose text_encoder/ and image_encoder/ start the run (else fresh)
    lr: float = 2e-3
    warmup: int = 200
    weight_decay: float = 0.05
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    patch: int = 4
    projection_dim: int = 128
    max_length: int = 32
    bf16: bool = True  # bfloat16 autocast: ~2x faster on CPUs with AVX512-BF16, weights stay float32


def make_clip(recipe: ClipRecipe, size: int, vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> CLIPModel:
    """A fresh CLIPModel; pad/bos/eos ids are explicit (eos == 2 would select CLIP's legacy pooling)."""
    text = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=recipe.hidden, intermediate_size=4 * recipe.hidden,
        num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
        max_position_embeddings=recipe.max_length, projection_dim=recipe.projection_dim,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=recipe.hidden, intermediate_size=4 * recipe.hidden, num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads, image_size=size, patch_size=recipe.patch,
        projection_dim=recipe.projection_dim,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=recipe.projection_dim)
    return CLIPModel(config)


def load_clip_towers(model: CLIPModel, components: Path) -> None:
    """Load an exported CLIP's text_encoder/ and image_encoder/ into ``model`` (same shapes; ``logit_scale`` is not
    exported and keeps its initial value)."""
    text = CLIPTextModelWithProjection.from_pretrained(components / "text_encoder")
    vision = CLIPVisionModelWithProjection.from_pretrained(components / "image_encoder")
    model.text_model.load_state_dict(text.text_model.state_dict())
    model.text_projection.load_state_dict(text.text_projection.state_dict())
    model.vision_model.load_state_dict(vision.vision_model.state_dict())
    model.visual_projection.load_state_dict(vision.visual_projection.state_dict())


def _embed(model: CLIPModel, pixels: torch.Tensor | None = None, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Projected embeddings (B, D) of images (B, 3, S, S) or token ids (B, L), as float32."""
    if pixels is not None:
        return model.get_image_features(pixel_values=pixels).pooler_output.float()
    return model.get_text_features(input_ids=ids).pooler_output.float()


def trim_padding(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Drop the padding columns after the longest sequence's first eos. ids: (B, L) -> (B, L').

    Exact for CLIP: attention is causal and pooling reads the first eos, so later pads change nothing.
    """
    first_eos = (ids == eos_id).int().argmax(1)
    return ids[:, : int(first_eos.max()) + 1]


def _scene_batch(backgrounds: np.ndarray, batch: int, same_background: float, g: torch.Generator) -> torch.Tensor:
    """Scene indices (batch,): a ``same_background`` share from one randomly chosen background, the rest uniform."""
    n_same = int(round(batch * same_background))
    si = torch.randint(len(backgrounds), (batch - n_same,), generator=g)
    if n_same == 0:
        return si
    anchor = int(backgrounds[int(torch.randint(len(backgrounds), (1,), generator=g))])
    group = torch.from_numpy(np.flatnonzero(backgrounds == anchor))
    return torch.cat([group[torch.randint(len(group), (n_same,), generator=g)], si])


class ClipObjective:
    """The tiny CLIP's loss for the training core: multi-positive InfoNCE over scenes (full or appearance-free
    captions) and subject crops (appearance texts), plus the recipe's shape heads."""

    def __init__(self, pool: ScenePool, recipe: ClipRecipe, size: int) -> None:
        self.pool, self.recipe, self.size = pool, recipe, size
        self.tokenizer = miniworld_tokenizer(recipe.max_length)
        # tokenize the whole pool once: the tokenizer is the slowest thing per sample otherwise
        tokenize_all = lambda texts: tokenize(self.tokenizer, texts, recipe.max_length)  # noqa: E731
        self.ids_full, self.ids_free = tokenize_all(pool.captions_full), tokenize_all(pool.captions_free)
        self.ids_crop = tokenize_all(pool.crop_texts)
        self.ids_wrong = tokenize_all(pool.captions_wrong_shape) if recipe.shape_negatives else None
        self.scene_shapes, self.crop_shapes = shape_labels(pool) if recipe.shape_loss > 0 else (None, None)
        self.patch_shapes = patch_shape_labels(pool.shape_maps, recipe.patch) if recipe.patch_shape_loss > 0 else None
        self.shape_cells = shape_cell_labels(pool.shape_maps, POSITION_GRID) if recipe.position_loss > 0 else None
        # A colour word names an object only if it is painted that very colour: scenes holding an off-palette object
        # (``colour_mix``) are paired with their appearance-free caption only, and only on-palette crops with their
        # "a {colour} ..." text; otherwise the contrastive loss sorts in-between colours into 8 categories with a
        # jump at the half-way blend. With an all-palette pool nothing changes.
        off_crop = off_palette_crops(pool)
        self.named_crops = torch.from_numpy(np.flatnonzero(~off_crop))
        if len(self.named_crops) == 0:
            raise ValueError("no subject crop of the pool is painted its named colour (colour_mix 1?); "
                             "use colour_mix < 1 so that crops can be paired with their colour words")
        self.scene_off_palette = torch.zeros(len(pool), dtype=torch.bool)
        self.scene_off_palette[torch.from_numpy(pool.crop_scene[off_crop])] = True
        if recipe.colour_loss > 0:
            self.scene_rgb = torch.from_numpy(pool.shape_rgb)  # (N, K, 3), NaN where the scene lacks the shape
            crop_shape = shape_labels(pool)[1]
            self.crop_rgb = (crop_shape, self.scene_rgb[torch.from_numpy(pool.crop_scene), crop_shape])  # (M,), (M, 3)
            self.patch_rgb = patch_colour_labels(pool.shape_rgb, patch_shape_labels(pool.shape_maps, recipe.patch))

    def config_dict(self) -> dict:
        return {"clip": asdict(self.recipe), "size": self.size}

    def check_resume(self, saved: dict, output_dir: Path) -> None:
        require_same(saved, self.config_dict(), ("clip", "size"), output_dir)

    def build_model(self) -> torch.nn.ModuleDict:
        """``clip`` (the exported CLIPModel) and the auxiliary heads; heads the recipe does not use stay frozen."""
        r, t = self.recipe, self.tokenizer
        heads = {
            "shape_head": (torch.nn.Linear(r.projection_dim, len(SHAPES)), r.shape_loss),
            "patch_head": (torch.nn.Linear(r.hidden, len(SHAPES) + 1), r.patch_shape_loss),  # background or a shape
            "position_head": (torch.nn.Linear(r.projection_dim, len(SHAPES) * POSITION_GRID**2), r.position_loss),
            "colour_head": (torch.nn.Linear(r.projection_dim, len(SHAPES) * 3), r.colour_loss),
            "patch_colour_head": (torch.nn.Linear(r.hidden, 3), r.colour_loss),
        }
        modules = {"clip": make_clip(r, self.size, len(t), t.bos_token_id, t.eos_token_id, t.pad_token_id)}
        if r.init_from:
            load_clip_towers(modules["clip"], Path(r.init_from))
        for name, (head, weight) in heads.items():
            modules[name] = head.requires_grad_(weight > 0)
        return torch.nn.ModuleDict(modules)

    def batches(self, state: RunState, accelerator):
        r, pool, g = self.recipe, self.pool, state.generator
        while True:
            si = _scene_batch(pool.backgrounds, r.batch_scenes, r.same_background, g)
            ci = self.named_crops[torch.randint(len(self.named_crops), (r.batch_crops,), generator=g)]
            use_full = (torch.rand(r.batch_scenes, generator=g) < r.p_full) & ~self.scene_off_palette[si]
            ids = torch.cat([torch.where(use_full[:, None], self.ids_full[si], self.ids_free[si]), self.ids_crop[ci]])
            n_pos = len(ids)
            if self.ids_wrong is not None:
                ids = torch.cat([ids, self.ids_wrong[si]])
            ids = trim_padding(ids, self.tokenizer.eos_token_id)
            pixels = clip_pixels(np.concatenate([pool.images[si.numpy()], pool.crops[ci.numpy()]]))
            yield {"scenes": si, "crops": ci, "ids": ids, "n_positive": n_pos, "pixels": pixels}

    def losses(self, model, batch, state: RunState) -> dict[str, torch.Tensor]:
        r, clip, si, ci, ids = self.recipe, model["clip"], batch["scenes"], batch["crops"], batch["ids"]
        vision = clip.vision_model(pixel_values=batch["pixels"])
        image_emb = clip.visual_projection(vision.pooler_output).float()  # = _embed(clip, pixels=...)
        text_emb = _embed(clip, ids=ids)
        n_pos, n_scenes = batch["n_positive"], len(si)
        with torch.autocast(image_emb.device.type, enabled=False):  # the losses in float32, outside mixed precision
            negatives = text_emb[n_pos:] if self.ids_wrong is not None else None
            loss = clip_loss(image_emb, text_emb[:n_pos], ids[:n_pos], clip.logit_scale.float(), negatives)
            out = {"contrastive": loss.detach()}
            if r.shape_loss > 0:
                shape_logits = model["shape_head"](image_emb)  # the raw embedding: what the decoder reads
                shape = (F.binary_cross_entropy_with_logits(shape_logits[:n_scenes], self.scene_shapes[si])
                         + F.cross_entropy(shape_logits[n_scenes:], self.crop_shapes[ci]))
                loss, out["shape"] = loss + r.shape_loss * shape, shape.detach()
            if r.patch_shape_loss > 0:
                tokens = vision.last_hidden_state[:n_scenes, 1:].float()  # (scenes, patches, hidden); 0 is CLS
                patch = F.cross_entropy(model["patch_head"](tokens).flatten(0, 1), self.patch_shapes[si].flatten())
                loss, out["patch_shape"] = loss + r.patch_shape_loss * patch, patch.detach()
            if r.position_loss > 0:
                position = F.binary_cross_entropy_with_logits(model["position_head"](image_emb[:n_scenes]),
                                                              self.shape_cells[si])
                loss, out["position"] = loss + r.position_loss * position, position.detach()
            if r.colour_loss > 0:
                colour = self._colour_error(model, image_emb, vision.last_hidden_state[:n_scenes, 1:].float(), si, ci)
                loss, out["colour"] = loss + r.colour_loss * colour, colour.detach()
        return {"loss": loss, **out}

    def _colour_error(self, model, image_emb: torch.Tensor, tokens: torch.Tensor, si: torch.Tensor,
                      ci: torch.Tensor) -> torch.Tensor:
        """Mean squared RGB error of the colour heads: per shape of each scene and of each crop from the raw
        embeddings (scenes + crops, D), per object patch from the tokens (scenes, P, hidden)."""
        n_scenes, k = len(si), len(SHAPES)
        said = model["colour_head"](image_emb).view(len(image_emb), k, 3)
        crop_shape, crop_rgb = self.crop_rgb[0][ci], self.crop_rgb[1][ci]
        said = torch.cat([said[:n_scenes].flatten(0, 1), said[n_scenes:][torch.arange(len(ci)), crop_shape]])
        truth = torch.cat([self.scene_rgb[si].flatten(0, 1), crop_rgb])
        patch_said, patch_truth = model["patch_colour_head"](tokens).flatten(0, 1), self.patch_rgb[si].flatten(0, 1)
        said, truth = torch.cat([said, patch_said]), torch.cat([truth, patch_truth])
        held = ~truth[:, 0].isnan()  # shapes the scene holds, object patches
        return F.mse_loss(said[held], truth[held])

    def validate(self, model, accelerator) -> None:
        return None

    def export(self, model, output_dir: Path) -> None:
        return None  # the stage exports after its held-out evaluation (:func:`run_clip_stage`)


def clip_loop_settings(recipe: ClipRecipe, work_dir: Path, seed: int) -> LoopSettings:
    """The training core's settings of the CLIP recipe: AdamW, warm-up then cosine to 10% of the peak."""
    return recipe_settings("clip", work_dir, recipe.steps, seed, recipe.lr, recipe.warmup, recipe.weight_decay,
                           mixed_precision="bf16" if recipe.bf16 else "no")


def train_clip(
    pool: ScenePool, work_dir: Path, recipe: ClipRecipe, seed: int, size: int, stop_after: int | None = None
) -> tuple[CLIPModel, object, dict[str, torch.nn.Module]]:
    """Train (resuming from ``work_dir/checkpoints``) and return ``(model, tokenizer, heads)``; ``heads`` are the
    auxiliary heads (``shape_head``, ``patch_head``, ``position_head``), which are not exported.

    ``stop_after`` ends the run early after that many steps, with a checkpoint (what a kill leaves behind).
    """
    objective = ClipObjective(pool, recipe, size)
    run = run_training(objective, clip_loop_settings(recipe, work_dir, seed), stop_after)
    modules = run.model.eval()
    heads = {k: m for k, m in modules.items() if k != "clip"}
    return modules["clip"], objective.tokenizer, heads


@torch.no_grad()
def evaluate_clip(model: CLIPModel, tokenizer, pool: ScenePool, max_length: int, n: int = 512,
                  shape_head: torch.nn.Module | None = None) -> dict[str, float]:
    """Top-1 retrieval on a (held-out) pool: image→full caption, image→appearance-free caption, crop→crop text;
    with ``shape_head`` (trained with ``shape_loss``), also how well it reads which shapes each scene holds (F1)."""
    n = min(n, len(pool))
    raw = _embed(model, pixels=clip_pixels(pool.images[:n]))
    img = F.normalize(raw, dim=-1)
    out = {}
    if shape_head is not None:
        said, truth = shape_head(raw) > 0, shape_labels(pool)[0][:n].bool()
        out["scene_shape_f1_of_head"] = (2 * (said & truth).sum() / (said.sum() + truth.sum())).item()
    for name, texts in (("full", pool.captions_full[:n]), ("free", pool.captions_free[:n])):
        txt = F.normalize(_embed(model, ids=tokenize(tokenizer, texts, max_length)), dim=-1)
        sims = img @ txt.T
        out[f"image_to_{name}_caption_top1"] = sims.argmax(1).eq(torch.arange(n)).float().mean().item()
        if name == "full":  # among captions of the same background only: do the objects decide?
            bg = torch.from_numpy(pool.backgrounds[:n])
            same = sims.masked_fill(bg[:, None] != bg[None, :], float("-inf"))
            out["image_to_full_caption_top1_same_background"] = (
                same.argmax(1).eq(torch.arange(n)).float().mean().item()
            )
            wrong = F.normalize(_embed(model, ids=tokenize(tokenizer, pool.captions_wrong_shape[:n], max_length)), dim=-1)
            # two captions that differ in one shape word: does the image prefer its own?
            out["image_prefers_caption_over_wrong_shape"] = (sims.diagonal() > (img * wrong).sum(-1)).float().mean().item()
    m = min(n, len(pool.crops))
    crop = F.normalize(_embed(model, pixels=clip_pixels(pool.crops[:m])), dim=-1)
    labels = sorted(set(pool.crop_texts[:m]))
    txt = F.normalize(_embed(model, ids=tokenize(tokenizer, labels, max_length)), dim=-1)
    truth = torch.tensor([labels.index(t) for t in pool.crop_texts[:m]])
    out["crop_to_appearance_top1"] = (crop @ txt.T).argmax(1).eq(truth).float().mean().item()
    out["n"] = n
    return out


def export_clip(model: CLIPModel, tokenizer, size: int, components: Path) -> None:
    """Write text_encoder/, image_encoder/, tokenizer/, image_processor/ under ``components`` (each atomically)."""
    text = CLIPTextModelWithProjection(model.config.text_config)
    text.text_model.load_state_dict(model.text_model.state_dict())
    text.text_projection.load_state_dict(model.text_projection.state_dict())
    vision = CLIPVisionModelWithProjection(model.config.vision_config)
    vision.vision_model.load_state_dict(model.vision_model.state_dict())
    vision.visual_projection.load_state_dict(model.visual_projection.state_dict())
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
    )
    for name, obj in (("text_encoder", text), ("image_encoder", vision), ("tokenizer", tokenizer),
                      ("image_processor", processor)):
        with atomic_dir(Path(components) / name) as tmp:
            obj.save_pretrained(tmp)


def run_clip_stage(pool: ScenePool, heldout: ScenePool, work_dir: Path, components: Path, recipe: ClipRecipe,
                   seed: int, size: int) -> dict[str, float]:
    """Train, evaluate on the held-out pool, export; returns the metrics (also written to work_dir)."""
    model, tokenizer, heads = train_clip(pool, work_dir, recipe, seed, size)
    metrics = evaluate_clip(model, tokenizer, heldout, recipe.max_length,
                            shape_head=heads["shape_head"] if recipe.shape_loss > 0 else None)
    atomic_write(Path(work_dir) / "metrics.json", json.dumps({"recipe": asdict(recipe), **metrics}, indent=2))
    export_clip(model, tokenizer, size, components)
    return metrics
