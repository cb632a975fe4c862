"""The whole builder chain on miniworld scenes, whose captions, boxes and masks are known: the model stages are
replaced by the renderer's ground truth (written as the stages' own shard files), and the feature store the builder
writes must be the very store the miniworld build writes for the same scenes."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from lambda_eclipse.dataset import build_dataset, load_build_config
from lambda_eclipse.dataset.crop import mask_box
from lambda_eclipse.dataset.records import Box, read_shard, write_shard
from lambda_eclipse.dataset.runner import Workdir
from lambda_eclipse.features import load_all, read_zero_image
from lambda_eclipse.miniworld.prior_stage import FeatureRecipe, scene_choices, write_scene_features
from lambda_eclipse.miniworld.scenes import sample_scenes

OPEN_FILTERS = ["filter.min_side=0", "filter.max_white_share=1.0", "filter.box_ratio_min=0.0",
                "filter.box_ratio_max=1.0", "filter.min_mask_share=0.0", "filter.min_logit=0.3"]
STORE_TENSORS = ("token_states", "token_offsets", "token_subject", "pooled_text", "target", "subject_embeds",
                 "subject_offsets", "edge", "edge_index")


def test_builder_on_ground_truth_scenes_writes_the_miniworld_store(tmp_path):
    from lambda_eclipse.cli import BUNDLED_MODEL
    from lambda_eclipse.dataset import ClipEncoders

    encoders = ClipEncoders.from_pretrained(str(BUNDLED_MODEL))  # the miniworld's own CLIP and word tokenizer
    n, size = 6, 32
    # Every sample with an edge map: the builder's `stages.edge` is one switch for the whole build. The caption
    # (full or appearance-free) stays the recipe's per-scene choice. Encoder batches differ on purpose (4 and 64).
    recipe = FeatureRecipe(seed=3, edge_prob=1.0, batch=4)
    miniworld = load_all(write_scene_features(encoders, tmp_path / "miniworld", n, "train", size, recipe))

    # The renderer hands the builder what a photographer would: the full-resolution photograph (the 4x canvas the
    # scene image is box-filtered from) with its caption, and the scene image as the target picture.
    scenes = sample_scenes(n, seed=recipe.seed, size=size)
    folder = tmp_path / "scenes"
    folder.mkdir()
    by_id = {}
    for index, scene in enumerate(scenes):
        stem = f"train-{recipe.seed}-{index}"
        Image.fromarray(scene.photo).save(folder / f"{stem}.png")
        Image.fromarray(scene.image).save(folder / f"{stem}.target.png")
        (folder / f"{stem}.txt").write_text(scene.captions[scene_choices(recipe.seed, index, recipe)[0]])
        by_id[f"{stem}.png"] = scene
    config = load_build_config(None, [
        f"input.path={folder}", f"output_dir={tmp_path / 'run'}", "models.captioner=none", "shard_size=4",
        f"stages.crop_size={size}", "stages.crop_resample=box", "stages.edge=true", "report_samples=2",
        "progress=false", *OPEN_FILTERS])
    build_dataset(config, {}, stages=("caption",))
    work = Workdir(config)
    for stage in ("nouns", "ground", "segment"):  # the renderer's answers in place of spaCy, Grounding DINO, SAM
        work.prepare(stage)
        for shard in range(len(work.shards)):
            records = read_shard(work.shard_path("caption", shard))
            for r in records:
                objects = by_id[r.source_id].objects
                r.nouns = {o.noun: o.noun for o in objects}
                if stage != "nouns":  # boxes and masks in the photograph's pixels
                    r.boxes = [Box(o.noun, tuple(float(v) for v in mask_box(o.photo_mask)), 1.0) for o in objects]
                if stage == "segment":
                    r.masks = [o.photo_mask for o in objects]
            write_shard(work.shard_path(stage, shard), records)
    store = build_dataset(config, {"encoders": encoders}, stages=("filter", "crop", "features"))

    # The builder's crops are the renderer's crops, pixel for pixel (one crop function, same photograph and mask).
    crops = {r.source_id: r for shard in range(len(work.shards)) for r in read_shard(work.shard_path("crop", shard))}
    assert sorted(crops) == sorted(by_id)
    for source_id, scene in by_id.items():
        assert [b.word for b in crops[source_id].boxes] == scene.nouns
        for crop, obj in zip(crops[source_id].crops, scene.objects, strict=True):
            assert np.array_equal(np.asarray(crop), obj.crop), (source_id, obj.noun)

    # The two stores are equal bit for bit: same captions and ids, same fp16 tensors (the store's dtype). The same
    # pictures and captions through the same encoders give the same floats, so no tolerance is needed.
    built = load_all(store)
    assert list(built.source_ids) == [f"{i}.png" for i in miniworld.source_ids]
    assert list(built.captions) == list(miniworld.captions)
    for name in STORE_TENSORS:
        a, b = getattr(built, name), getattr(miniworld, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert int((built.token_subject >= 0).sum()) >= n  # every sample binds at least one subject's tokens
    assert torch.equal(read_zero_image(store), read_zero_image(tmp_path / "miniworld"))

    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["images_out"] == n and report["drops"]["filter"]["logit"] == 0
    assert sum(int(k) * v for k, v in report["subjects_per_image"].items()) == sum(len(s.objects) for s in scenes)
