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
    patch_shape_labels,
    shape_cell_labels,
    shape_labels,
    tokenize,
)
from .training import (
    Checkpointer,
    atomic_dir,
    cosine_lr,
    finish_step,
    load_checkpoint,
    optimizer_step,
    progress,
    set_lr,
    step_generator,
)
from .vocab import SHAPES, miniworld_tokenizer

POSITION_GRID = 4  # cells per side of the position head's grid
CLIP_COMPONENTS = ("text_encoder", "image_encoder", "tokenizer", "image_processor")


@dataclass(frozen=True)
class ClipRecipe:
    """Tiny CLIP: model shape and training schedule."""

    steps: int = 2500
    batch_scenes: int = 96  # scene images per batch
    batch_crops: int = 48  # subject crops per batch
    p_full: float = 0.7  # chance a scene is paired with its full caption (else the appearance-free one)
    # The decoder sees only the image embedding, so it must carry each object's shape; plain contrastive training
    # (the first bundle: 800 steps, 3 layers, lr 1e-3) left it nearly blind to them: a linear probe read which
    # shapes a scene holds at F1 0.19, an image preferred its own caption over the same caption with one shape word
    # changed 67% of the time, and nearest neighbours shared the background always but the shape set 8% of the time.
    # The four options below fix that; each is a switch so the effect of each stays measurable.
    # same_background: share of each batch's scenes drawn from one background, so that those negatives differ
    #   only in their objects. Alone, 2,400 steps: held-out caption top-1 0.81 -> 0.94, probe F1 0.19 -> 0.31.
    same_background: float = 0.5
    # shape_negatives: each scene's full caption with one shape word changed is an extra negative for its image.
    shape_negatives: bool = True
    # shape_loss: weight of an auxiliary loss through a linear head (not exported) that must read the shapes of a
    #   scene (multi-hot) and of a crop from the raw image embedding (what the decoder reads). With the two options
    #   above, 2,000 steps (3 layers, lr 1e-3): wrong-shape preference 0.82, scene-shape F1 of the head 0.39 (0.22
    #   with the head on the normalised embedding; patch 2 instead of 4: no better at 3x the cost per step).
    shape_loss: float = 1.0
    # patch_shape_loss: weight of a per-patch loss through a linear head (not exported) on the vision tower's patch
    #   tokens, which must name the shape covering each patch (or background). Dense supervision: the tower learns
    #   to see shapes where they are instead of discovering them from a few bits of multi-hot label. Shapes alone
    #   (no contrastive loss), batches of 96 scenes: the scene head alone reached held-out scene-shape F1 0.56 after
    #   1,000 steps (scene loss 0.45 at step 600); with this head, 0.58 after 600 steps (scene loss 0.38); 0.68 with
    #   lr 2e-3; 0.70 with 4 layers. The shipped recipe (all four, 4 layers, lr 2e-3, 2,500 steps, about 20 min at 2 threads):
    #   wrong-shape preference 0.91, scene-shape F1 0.68, caption top-1 0.93, appearance-free top-1 0.43,
    #   crop->appearance 0.99.
    patch_shape_loss: float = 1.0
    # position_loss: weight of a loss through a linear head (not exported) on the raw image embedding that must say
    #   where each shape is (shape x cell of a 4 x 4 grid, multi-hot). The shipped CLIP's embedding reads which
    #   shapes a scene holds at linear-probe F1 0.77 but shape x cell at only 0.13, and the decoder misplaces
    #   objects (centre error 10.6 px on ground-truth embeddings). Off in the shipped recipe: continuing the shipped
    #   CLIP 800 steps with it (1.0) vs without gave shape x cell probe F1 0.167 vs 0.164, no gain. The same 800
    #   extra steps did raise shapes: probe F1 0.77 -> 0.84, head F1 0.68 -> 0.78, wrong-shape preference 0.94.
    position_loss: float = 0.0
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


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, text_ids: torch.Tensor, logit_scale: torch.Tensor,
              negative_emb: torch.Tensor | None = None):
    """Symmetric InfoNCE with multi-positive targets. image_emb, text_emb: (B, D); text_ids: (B, L);
    negative_emb: (K, D) texts that match no image (hard negatives), added to each image's candidates.

    Appearance-free captions and crop texts repeat within a batch; every identical text is a positive,
    so the loss never pushes apart two images that fit the same words.
    """
    image_emb = F.normalize(image_emb, dim=-1)
    text_emb = F.normalize(text_emb, dim=-1)
    scale = logit_scale.exp().clamp(max=100.0)
    logits = scale * image_emb @ text_emb.T  # (B, B)
    same = (text_ids[:, None, :] == text_ids[None, :, :]).all(-1).float()
    targets = same / same.sum(1, keepdim=True)
    image_logits, image_targets = logits, targets
    if negative_emb is not None:  # image -> text only: a negative text has no image of its own
        image_logits = torch.cat([logits, scale * image_emb @ F.normalize(negative_emb, dim=-1).T], 1)
        image_targets = F.pad(targets, (0, len(negative_emb)))
    return 0.5 * (-(image_targets * image_logits.log_softmax(1)).sum(1).mean()
                  - (targets * logits.log_softmax(0)).sum(0).mean())


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


def train_clip(
    pool: ScenePool, work_dir: Path, recipe: ClipRecipe, seed: int, size: int, stop_at: int | None = None
) -> tuple[CLIPModel, object, dict[str, torch.nn.Module]]:
    """Train (resuming from ``work_dir/ckpt.pt``) and return ``(model, tokenizer, heads)``; ``heads`` are the
    auxiliary heads (``shape_head``, ``patch_head``), which are not exported.

    ``stop_at`` ends the run early after that many steps, with a checkpoint (what a kill leaves behind).
    """
    tokenizer = miniworld_tokenizer(recipe.max_length)
    torch.manual_seed(seed)
    model = make_clip(
        recipe, size, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    shape_head = torch.nn.Linear(recipe.projection_dim, len(SHAPES))
    patch_head = torch.nn.Linear(recipe.hidden, len(SHAPES) + 1)  # per patch token: background or a shape
    position_head = torch.nn.Linear(recipe.projection_dim, len(SHAPES) * POSITION_GRID**2)
    heads = {"shape_head": shape_head, "patch_head": patch_head, "position_head": position_head}
    weights = {"shape_head": recipe.shape_loss, "patch_head": recipe.patch_shape_loss,
               "position_head": recipe.position_loss}
    # only the heads in use are optimised: the optimizer's layout then follows the recipe, so a run's checkpoint
    # resumes under code that has added heads since
    params = list(model.parameters()) + [p for k, h in heads.items() if weights[k] > 0 for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    ckpt_path = Path(work_dir) / "ckpt.pt"
    state = load_checkpoint(ckpt_path)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        for name, head in heads.items():
            if name in state:  # checkpoints of runs from before a head existed have none
                head.load_state_dict(state[name])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
    # tokenize the whole pool once: the tokenizer is the slowest thing per sample otherwise
    ids_full = tokenize(tokenizer, pool.captions_full, recipe.max_length)
    ids_free = tokenize(tokenizer, pool.captions_free, recipe.max_length)
    ids_crop = tokenize(tokenizer, pool.crop_texts, recipe.max_length)
    if recipe.shape_negatives:
        ids_wrong = tokenize(tokenizer, pool.captions_wrong_shape, recipe.max_length)
    if recipe.shape_loss > 0:
        scene_shapes, crop_shapes = shape_labels(pool)
    if recipe.patch_shape_loss > 0:
        patch_shapes = patch_shape_labels(pool.shape_maps, recipe.patch)
    if recipe.position_loss > 0:
        shape_cells = shape_cell_labels(pool.shape_maps, POSITION_GRID)
    ckpt = Checkpointer(ckpt_path, recipe.steps)
    state_fn = lambda: {
        "model": model.state_dict(), "optimizer": opt.state_dict(), **{k: h.state_dict() for k, h in heads.items()}
    }
    bar = progress(recipe.steps, start, "clip")
    model.train()
    for step in range(start, recipe.steps):
        g = step_generator(seed, step, stream=1)
        si = _scene_batch(pool.backgrounds, recipe.batch_scenes, recipe.same_background, g)
        ci = torch.randint(len(pool.crops), (recipe.batch_crops,), generator=g)
        use_full = torch.rand(recipe.batch_scenes, generator=g) < recipe.p_full
        ids = torch.cat([torch.where(use_full[:, None], ids_full[si], ids_free[si]), ids_crop[ci]])
        n_pos = len(ids)
        if recipe.shape_negatives:
            ids = torch.cat([ids, ids_wrong[si]])
        ids = trim_padding(ids, tokenizer.eos_token_id)
        pixels = clip_pixels(np.concatenate([pool.images[si.numpy()], pool.crops[ci.numpy()]]))
        set_lr(opt, cosine_lr(step, recipe.steps, recipe.lr, recipe.warmup))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
            vision = model.vision_model(pixel_values=pixels)
            image_emb = model.visual_projection(vision.pooler_output).float()  # = _embed(model, pixels=pixels)
            text_emb = _embed(model, ids=ids)
        negatives = text_emb[n_pos:] if recipe.shape_negatives else None
        loss = clip_loss(image_emb, text_emb[:n_pos], ids[:n_pos], model.logit_scale, negatives)
        if recipe.shape_loss > 0:
            shape_logits = shape_head(image_emb)  # the raw embedding: what the decoder reads
            n_scenes = len(si)
            loss = loss + recipe.shape_loss * (
                F.binary_cross_entropy_with_logits(shape_logits[:n_scenes], scene_shapes[si])
                + F.cross_entropy(shape_logits[n_scenes:], crop_shapes[ci])
            )
        if recipe.patch_shape_loss > 0:
            tokens = vision.last_hidden_state[: len(si), 1:].float()  # (scenes, patches, hidden); 0 is the CLS token
            loss = loss + recipe.patch_shape_loss * F.cross_entropy(
                patch_head(tokens).flatten(0, 1), patch_shapes[si].flatten()
            )
        if recipe.position_loss > 0:
            loss = loss + recipe.position_loss * F.binary_cross_entropy_with_logits(
                position_head(image_emb[: len(si)]), shape_cells[si]
            )
        optimizer_step(loss, (model, *heads.values()), opt)
        if finish_step(step, loss, bar, ckpt, state_fn, stop_at, digits=3):
            break
    bar.close()
    model.eval()
    return model, tokenizer, heads


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
    (Path(work_dir) / "metrics.json").write_text(json.dumps({"recipe": asdict(recipe), **metrics}, indent=2))
    export_clip(model, tokenizer, size, components)
    return metrics
