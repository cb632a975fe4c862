"""The miniature-model recipes: a smoke build end to end, exact resumption, the latent fold, atomic writes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDPMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel
from PIL import Image
from transformers import AutoImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

from lambda_eclipse.atomic import atomic_dir
from lambda_eclipse.losses import clip_loss
from lambda_eclipse.miniworld.build import COMPONENTS, STAGES, BuildConfig, build_components, smoke_config
from lambda_eclipse.miniworld.clip_recipe import ClipObjective, _scene_batch, train_clip, trim_padding
from lambda_eclipse.miniworld.data import (
    background_index,
    clip_pixels,
    patch_colour_labels,
    patch_shape_labels,
    render_pool,
    shape_cell_labels,
    shape_labels,
)
from lambda_eclipse.miniworld.scenes import sample_scenes
from lambda_eclipse.miniworld.vocab import COLOURS, SHAPES
from lambda_eclipse.miniworld.movq_recipe import fold_latent_normalisation, make_movq, train_movq
from lambda_eclipse.miniworld.unet_recipe import train_unet
from lambda_eclipse.train.checkpoint import RunState, list_checkpoints

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a whole build or install: the slow tier (CI runs it)
def test_smoke_build_writes_loadable_components(smoke_build: Path) -> None:
    built = smoke_build / "components-build"
    comp = built / "components"
    assert all((comp / name).is_dir() for name in COMPONENTS)
    assert not any(p.name.startswith(".tmp") for p in comp.iterdir())
    tok = CLIPTokenizer.from_pretrained(comp / "tokenizer")
    text = CLIPTextModelWithProjection.from_pretrained(comp / "text_encoder")
    assert text.config.eos_token_id == tok.eos_token_id != 2
    assert (text.config.bos_token_id, text.config.pad_token_id) == (tok.bos_token_id, tok.pad_token_id)
    vision = CLIPVisionModelWithProjection.from_pretrained(comp / "image_encoder")
    processor = AutoImageProcessor.from_pretrained(comp / "image_processor")
    pool = render_pool(2, seed=5, size=32)
    pixels = processor(images=[Image.fromarray(im) for im in pool.images], return_tensors="pt").pixel_values
    assert torch.allclose(pixels, clip_pixels(pool.images))  # training saw what the processor gives
    with torch.no_grad():
        emb = vision(pixel_values=pixels).image_embeds
        neg = vision(pixel_values=torch.zeros(1, 3, 32, 32)).image_embeds.expand_as(emb)
        ids = tok(["a red ball on a plain gray background"], return_tensors="pt").input_ids
        assert text(input_ids=ids).text_embeds.shape == (1, emb.shape[1])
    scheduler = DDPMScheduler.from_pretrained(comp / "scheduler")
    assert scheduler.config.variance_type == "fixed_small" and scheduler.config.beta_end == 0.012
    pipe = KandinskyV22Pipeline(
        unet=UNet2DConditionModel.from_pretrained(comp / "unet"), scheduler=scheduler,
        movq=VQModel.from_pretrained(comp / "movq"),
    )
    pipe.set_progress_bar_config(disable=True)
    images = pipe(image_embeds=emb, negative_image_embeds=neg, height=32, width=32, num_inference_steps=2,
                  guidance_scale=4.0, output_type="np").images
    assert images.shape == (2, 32, 32, 3)
    assert (built / "report.json").exists() and (built / "work" / "unet" / "samples.png").exists()
    clip_report = json.loads((built / "report.json").read_text())["clip"]  # the shape options are on by default
    assert clip_report["n"] == 32  # the held-out pool of the smoke config
    assert clip_report["scene_shape_f1_of_head"] > 0  # the head says some shape is there (it is: every scene has one)
    assert [p.name for p in list_checkpoints(built / "work" / "clip")] == ["step-000003"]  # the core's checkpoints


@pytest.mark.slow  # a whole build or install: the slow tier (CI runs it)
def test_rerun_skips_complete_stages(smoke_build: Path, capsys) -> None:
    built = smoke_build / "components-build"
    stamp = {n: (built / "components" / n).stat().st_mtime_ns for n in COMPONENTS}
    build_components(built, smoke_config(), verify_steps=2)
    assert stamp == {n: (built / "components" / n).stat().st_mtime_ns for n in COMPONENTS}
    assert capsys.readouterr().out.count("complete, skipped") == 4  # clip, movq, unet and its colour continuation


def test_build_runs_only_the_stages_asked_for(tmp_path: Path) -> None:
    config = smoke_config()
    build_components(tmp_path, config, verify_steps=2, stages=("clip",))
    assert sorted(p.name for p in (tmp_path / "components").iterdir()) == sorted(
        ("text_encoder", "image_encoder", "tokenizer", "image_processor"))
    with pytest.raises(ValueError, match="unknown stages"):
        build_components(tmp_path, config, stages=("vae",))


def test_clip_batches_hold_a_same_background_share() -> None:
    pool = render_pool(120, seed=3, size=32)
    scenes = sample_scenes(120, seed=3, size=32)
    assert list(pool.backgrounds) == [background_index(s) for s in scenes]
    assert len(set(pool.backgrounds.tolist())) > 5
    for step in range(5):
        idx = _scene_batch(pool.backgrounds, 16, 0.5, torch.Generator().manual_seed(step))
        assert idx.shape == (16,)
        assert len(set(pool.backgrounds[idx[:8].numpy()].tolist())) == 1  # the first half: one background
    uniform = _scene_batch(pool.backgrounds, 16, 0.0, torch.Generator().manual_seed(0))
    assert len(set(pool.backgrounds[uniform.numpy()].tolist())) > 1


def test_pool_labels_and_wrong_shape_captions_follow_the_scenes() -> None:
    pool = render_pool(40, seed=4, size=32)
    scenes = sample_scenes(40, seed=4, size=32)
    scene_shapes, crop_shapes = shape_labels(pool)
    shapes = list(SHAPES)
    for i, scene in enumerate(scenes):
        assert {shapes[k] for k in scene_shapes[i].nonzero().flatten().tolist()} == {o.shape for o in scene.objects}
        full, wrong = scene.captions["full"], pool.captions_wrong_shape[i]
        assert wrong != full and len(wrong.split()) - len(full.split()) in (-1, 0, 1)  # "paper plane" is 2 words
        changed = [w for w in (set(full.split()) ^ set(wrong.split())) if w not in ("paper", "plane")]
        assert all(w in shapes or w in ("paper plane",) for w in changed)
    assert [shapes[k] for k in crop_shapes[:3].tolist()] == [t.split(" ", 3)[3] for t in pool.crop_texts[:3]]


def test_shape_maps_and_patch_labels_follow_the_objects() -> None:
    pool = render_pool(12, seed=6, size=32)
    scenes = sample_scenes(12, seed=6, size=32)
    labels = patch_shape_labels(pool.shape_maps, patch=4)  # (12, 64)
    assert labels.shape == (12, 64)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            k = 1 + list(SHAPES).index(obj.shape)
            assert (pool.shape_maps[i][obj.mask] == k).all()
            # the patch under the object's centre of mass names its shape (objects are 8+ px, patches 4 px)
            ys, xs = np.nonzero(obj.mask)
            assert k in labels[i].view(8, 8)[int(ys.mean()) // 4 - 1: int(ys.mean()) // 4 + 2,
                                            int(xs.mean()) // 4 - 1: int(xs.mean()) // 4 + 2]
        assert np.array_equal(pool.object_masks[i], np.any([o.mask for o in scene.objects], axis=0))
        assert set(labels[i].unique().tolist()) <= {0} | {1 + list(SHAPES).index(o.shape) for o in scene.objects}
    # a patch a shape barely touches is background: a 4x4 patch with 3 object pixels
    sparse = np.zeros((1, 8, 8), np.uint8)
    sparse[0, 0, :3] = 2
    sparse[0, 4:, 4:] = 5
    assert patch_shape_labels(sparse, 4).tolist() == [[0, 0, 0, 5]]
    cells = shape_cell_labels(sparse, grid=2).view(1, len(SHAPES), 2, 2)  # shape 1 ("box") top-left, 4 bottom-right
    assert cells.nonzero().tolist() == [[0, 1, 0, 0], [0, 4, 1, 1]]
    for i, scene in enumerate(scenes):  # every object is somewhere, and only objects are
        occupied = shape_cell_labels(pool.shape_maps[i : i + 1]).view(len(SHAPES), -1).any(1)
        assert {SHAPES[k] for k in occupied.nonzero().flatten().tolist()} == {o.shape for o in scene.objects}


def test_colour_labels_hold_the_painted_rgb_and_the_colour_heads_learn_from_them() -> None:
    mixed = render_pool(30, seed=7, size=32, colour_mix=1.0)  # every object blended off the palette
    plain = render_pool(30, seed=7, size=32)
    scenes = sample_scenes(30, seed=7, size=32)
    assert mixed.shape_rgb.shape == (30, len(SHAPES), 3)
    for i, scene in enumerate(scenes):
        held = {list(SHAPES).index(o.shape): np.asarray(COLOURS[o.colour]) / 255 for o in scene.objects}
        assert set(np.flatnonzero(~np.isnan(plain.shape_rgb[i, :, 0]))) == set(held)
        for k, rgb in held.items():
            assert np.allclose(plain.shape_rgb[i, k], rgb)
            # blended toward another palette colour c by a weight w < 1/2: on the segment from its own colour to c
            m, weights = mixed.shape_rgb[i, k], []
            for c in (np.asarray(v) / 255 for v in COLOURS.values() if not np.allclose(np.asarray(v) / 255, rgb)):
                w = float(np.dot(m - rgb, c - rgb) / np.dot(c - rgb, c - rgb))
                if np.abs(rgb + w * (c - rgb) - m).max() < 1e-5:
                    weights.append(w)
            assert weights and all(0 <= w < 0.5 for w in weights) and np.abs(m - rgb).max() > 0
    patch_shapes = patch_shape_labels(mixed.shape_maps, 4)
    patch_rgb = patch_colour_labels(mixed.shape_rgb, patch_shapes)  # (30, 64, 3)
    assert patch_rgb[patch_shapes == 0].isnan().all() and not patch_rgb[patch_shapes > 0].isnan().any()
    n, p = (patch_shapes > 0).nonzero()[0].tolist()
    assert torch.equal(patch_rgb[n, p], torch.from_numpy(mixed.shape_rgb[n, int(patch_shapes[n, p]) - 1]))
    # the loss is finite on a batch, and the heads' error falls when fitted (they read the colour from the embedding)
    recipe = replace(smoke_config().clip, colour_loss=1.0, shape_loss=0.0, patch_shape_loss=0.0, shape_negatives=False)
    with pytest.raises(ValueError, match="colour_mix < 1"):  # no crop left to pair with its colour word
        ClipObjective(mixed, recipe, 32)
    half = render_pool(30, seed=7, size=32, colour_mix=0.5)
    objective = ClipObjective(half, recipe, 32)
    off = objective.scene_off_palette
    assert 0 < int(off.sum()) < 30
    batch = next(objective.batches(RunState(generator=torch.Generator().manual_seed(0)), None))
    n_scenes = len(batch["scenes"])
    assert off[batch["scenes"]].any() and not off[batch["scenes"]].all()
    for k, scene in enumerate(batch["scenes"].tolist()):  # a colour word names only objects painted that colour
        said = objective.tokenizer.decode(batch["ids"][k], skip_special_tokens=True)
        if off[scene]:
            assert said == objective.tokenizer.decode(objective.ids_free[scene], skip_special_tokens=True)
    crop_rgb = half.shape_rgb[half.crop_scene[batch["crops"]], objective.crop_rgb[0][batch["crops"]]]
    named = np.asarray([COLOURS[half.crop_texts[c].split(" ")[1]] for c in batch["crops"].tolist()]) / 255
    assert np.allclose(crop_rgb, named) and len(batch["crops"]) + n_scenes == batch["n_positive"]
    model = objective.build_model()
    assert model["colour_head"].weight.requires_grad and not model["shape_head"].weight.requires_grad
    si, ci = torch.arange(8), torch.arange(4)
    pixels = clip_pixels(np.concatenate([half.images[:8], half.crops[:4]]))
    vision = model["clip"].vision_model(pixel_values=pixels)
    emb, tokens = model["clip"].visual_projection(vision.pooler_output), vision.last_hidden_state[:8, 1:]
    heads = torch.optim.Adam([*model["colour_head"].parameters(), *model["patch_colour_head"].parameters()], 0.05)
    errors = []
    for _ in range(60):
        error = objective._colour_error(model, emb.detach(), tokens.detach(), si, ci)
        heads.zero_grad()
        error.backward()
        heads.step()
        errors.append(error.item())
    assert np.isfinite(errors[0]) and errors[-1] < 0.5 * errors[0]


def test_hard_negatives_only_add_image_side_candidates() -> None:
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    ids = torch.arange(4)[:, None].repeat(1, 3)
    scale = torch.tensor(2.0)
    base = clip_loss(img, txt, ids, scale)
    assert torch.equal(base, clip_loss(img, txt, ids, scale, None))
    # a negative identical to each image's own text is as attractive as the positive: the loss must rise
    assert clip_loss(img, txt, ids, scale, txt.clone()) > base
    # a negative pointing away from every image barely matters
    assert torch.allclose(clip_loss(img, txt, ids, scale, -100 * img.mean(0, keepdim=True)), base, atol=0.05)


@pytest.mark.parametrize("stage", ["clip", "clip-shape", "movq", "unet"])
def test_killed_stage_resumes_exactly(tmp_path: Path, stage: str) -> None:
    cfg = smoke_config()
    pool = render_pool(40, seed=1, size=32)

    def run(work: Path, stop_after: int | None):
        if stage.startswith("clip"):
            recipe = replace(cfg.clip, steps=4)
            if stage == "clip-shape":  # every shape option on: the head is part of the resumable state
                recipe = replace(recipe, same_background=0.5, shape_negatives=True, shape_loss=1.0, patch_shape_loss=1.0,
                                 position_loss=1.0)
            return train_clip(pool, work, recipe, seed=0, size=32, stop_after=stop_after)
        if stage == "movq":
            return train_movq(pool, work, replace(cfg.movq, steps=4), seed=0, stop_after=stop_after)
        g = torch.Generator().manual_seed(0)
        lat, emb = torch.randn(40, 4, 8, 8, generator=g), torch.randn(40, 16, generator=g)
        return train_unet(lat, emb, torch.zeros(1, 16), work, replace(cfg.unet, steps=4), seed=0, stop_after=stop_after)

    def weights(result) -> dict[str, torch.Tensor]:
        if stage.startswith("clip"):  # (model, tokenizer, heads): the heads are part of the resumable state
            model, _, heads = result
            return {**model.state_dict(), **{f"{h}.{k}": v for h, m in heads.items() for k, v in m.state_dict().items()}}
        return result.state_dict()

    straight = weights(run(tmp_path / "a", None))
    run(tmp_path / "b", 2)  # "killed" after step 2, checkpoint left behind
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-000002"]
    resumed = weights(run(tmp_path / "b", None))
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-000004"]
    for k, v in straight.items():
        assert torch.equal(v, resumed[k]), k  # bitwise: the same draws and the same arithmetic
    initial = weights(run(tmp_path / "c", 0))  # no step taken: the initial weights
    assert any(not torch.equal(v, initial[k]) for k, v in straight.items())  # training moved them



@pytest.mark.slow  # the colour stage is off in the shipped build; the slow tier keeps it working
def test_colour_stage_continues_a_bundles_unet_in_place(smoke_build: Path, tmp_path: Path) -> None:
    import shutil

    from lambda_eclipse.miniworld.unet_recipe import ColourRecipe, run_colour_stage

    bundle = tmp_path / "bundle"
    shutil.copytree(smoke_build / "bundle", bundle)
    before = UNet2DConditionModel.from_pretrained(bundle / "unet").state_dict()
    recipe, main = ColourRecipe(steps=2, batch=4, scenes=12, pairs=6, warmup=1), smoke_config().unet
    assert run_colour_stage(bundle, tmp_path / "work", recipe, main, 0, 32, stop_after=1, half=True)["complete"] is False
    assert torch.equal(UNet2DConditionModel.from_pretrained(bundle / "unet").state_dict()["conv_in.weight"],
                       before["conv_in.weight"])  # a cut-short run leaves the bundle's UNet untouched
    assert run_colour_stage(bundle, tmp_path / "work", recipe, main, 0, 32, half=True)["complete"] is True
    from safetensors.torch import load_file

    stored = load_file(str(bundle / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.float16}  # a bundle stores its UNet in float16
    after = UNet2DConditionModel.from_pretrained(bundle / "unet")
    assert any(not torch.equal(v.float(), before[k].float()) for k, v in after.state_dict().items())
    assert BuildConfig().colour.steps == 0 and ColourRecipe().steps == 2000 and "colour" in STAGES  # off when shipped


@pytest.mark.slow  # the colour stage is off in the shipped build; the slow tier keeps it working
def test_colour_pairs_condition_on_the_slerp_of_their_ends(smoke_build: Path) -> None:
    from transformers import CLIPVisionModelWithProjection

    from lambda_eclipse.miniworld.data import clip_pixels, unit_pixels
    from lambda_eclipse.miniworld.scenes import render_scene, scene_seed
    from lambda_eclipse.miniworld.unet_recipe import encode_colour_pairs

    components = smoke_build / "components-build" / "components"
    movq, encoder = VQModel.from_pretrained(components / "movq").eval(), CLIPVisionModelWithProjection.from_pretrained(
        components / "image_encoder").eval()
    latents, conds = encode_colour_pairs(3, 0, 32, 40, movq, encoder, batch=2)
    assert latents.shape == (3, 4, 16, 16) and conds.shape == (3, encoder.config.projection_dim)
    with torch.no_grad():
        plain = encoder(pixel_values=clip_pixels(render_scene(scene_seed(0, 40), 32).image[None])).image_embeds[0]
        own = movq.encode(unit_pixels(render_scene(scene_seed(0, 40), 32).image[None])).latents[0]
    # the condition starts from the scene as rendered (cosine, not equality: t > 0) and the image is not that scene
    assert torch.nn.functional.cosine_similarity(conds[0], plain, dim=0) > 0.5
    assert not torch.allclose(latents[0], own)


def test_v_prediction_recipe_saves_its_scheduler(smoke_build: Path, tmp_path: Path) -> None:
    assert smoke_config().unet.prediction_type == "v_prediction"  # the recipe's departure from K2.2's epsilon
    scheduler = DDPMScheduler.from_pretrained(smoke_build / "components-build" / "components" / "scheduler")
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.beta_start == 0.00085
    with pytest.raises(ValueError, match="prediction_type"):
        train_unet(torch.zeros(2, 4, 8, 8), torch.zeros(2, 8), torch.zeros(1, 8), tmp_path / "x",
                   replace(smoke_config().unet, prediction_type="sample"), seed=0)


def test_latent_fold_is_exact_and_normalises() -> None:
    torch.manual_seed(0)
    movq = make_movq(smoke_config().movq).eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        lat = movq.encode(x).latents
        before = movq.decode(lat, force_not_quantize=True).sample
        mean, std = lat.mean(dim=(0, 2, 3)), lat.std(dim=(0, 2, 3))
        fold_latent_normalisation(movq, mean, std)
        lat2 = movq.encode(x).latents
        after = movq.decode(lat2, force_not_quantize=True).sample
    assert torch.allclose(before, after, atol=1e-5)
    assert torch.allclose(lat2.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(lat2.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4)


def test_clip_loss_counts_identical_texts_as_positives() -> None:
    emb = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    ids = torch.tensor([[0, 5, 1], [0, 5, 1], [0, 6, 1]])
    scale = torch.tensor(4.6)
    # images 0 and 1 share a text: a perfect model gives both the same embedding, and must not be penalised
    perfect = torch.stack([emb[0], emb[0], emb[2]])
    assert clip_loss(perfect, perfect, ids, scale) < clip_loss(perfect, perfect[[1, 2, 0]], ids, scale)
    assert trim_padding(torch.tensor([[0, 7, 1, 1, 1], [0, 7, 8, 1, 1]]), eos_id=1).shape == (2, 4)


def test_atomic_dir_keeps_old_folder_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "comp"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("two")
        raise RuntimeError("killed")
    assert (final / "a.txt").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["comp"]


def test_shipped_config_parses_to_the_defaults() -> None:
    data = yaml.safe_load((ROOT / "configs" / "miniworld.yaml").read_text())
    assert BuildConfig.from_dict(data) == BuildConfig()
    with pytest.raises(TypeError):
        BuildConfig.from_dict({"unet": {"no_such_field": 1}})
