"""The builder's filter, crop and binding logic on miniworld scenes, whose captions, boxes and masks are known:
the model stages are replaced by the renderer's ground truth, written as the stages' own shard files."""

from __future__ import annotations

import numpy as np
from PIL import Image

from lambda_eclipse.dataset import build_dataset, load_build_config
from lambda_eclipse.dataset.records import Box, read_shard, write_shard
from lambda_eclipse.dataset.runner import Workdir
from lambda_eclipse.features import load_all
from lambda_eclipse.miniworld.scenes import sample_scenes

OPEN_FILTERS = ["filter.min_side=0", "filter.max_white_share=1.0", "filter.box_ratio_min=0.0",
                "filter.box_ratio_max=1.0", "filter.min_mask_share=0.0", "filter.min_logit=0.3"]


def test_ground_truth_scenes_through_filter_crop_and_features(tmp_path):
    from lambda_eclipse.cli import BUNDLED_MODEL
    from lambda_eclipse.dataset import ClipEncoders

    encoders = ClipEncoders.from_pretrained(str(BUNDLED_MODEL))  # the miniworld's own CLIP and word tokenizer
    scenes = sample_scenes(6, seed=3, size=64, crop_size=32)
    folder = tmp_path / "scenes"
    folder.mkdir()
    for i, scene in enumerate(scenes):
        Image.fromarray(scene.image).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(scene.captions["full"])
    config = load_build_config(None, [f"input.path={folder}", f"output_dir={tmp_path / 'run'}", "models.captioner=none",
                                      "shard_size=4", "stages.crop_size=32", "progress=false", *OPEN_FILTERS])
    build_dataset(config, {}, stages=("caption",))
    work = Workdir(config)
    by_id = {f"{i}.png": scene for i, scene in enumerate(scenes)}
    for stage in ("nouns", "ground", "segment"):  # the renderer's answers in place of spaCy, Grounding DINO, SAM
        work.prepare(stage)
        for shard in range(len(work.shards)):
            records = read_shard(work.shard_path("caption", shard))
            for r in records:
                objects = by_id[r.source_id].objects
                r.nouns = {o.noun: o.noun for o in objects}
                if stage != "nouns":
                    r.boxes = [Box(o.noun, tuple(float(v) for v in o.box), 1.0) for o in objects]
                if stage == "segment":
                    r.masks = [o.mask for o in objects]
            write_shard(work.shard_path(stage, shard), records)
    store = build_dataset(config, {"encoders": encoders}, stages=("filter", "crop", "features"))

    block = load_all(store)
    assert sorted(block.source_ids) == sorted(by_id)  # every scene passes the open filters
    for i in range(len(block)):
        sample = block.sample(i)
        scene = by_id[sample.source_id]
        nouns = list(dict.fromkeys(o.noun for o in scene.objects))
        assert sample.num_subjects == len(nouns)  # one subject per distinct noun, in caption order
        ids = encoders.tokenizer(sample.caption).input_ids
        for k, noun in enumerate(nouns):
            bound = [ids[t] for t in range(len(ids)) if int(sample.token_subject[t]) == k]
            assert encoders.tokenizer.decode(bound).replace(" ", "") == noun.replace(" ", "")
    crops = {r.source_id: r for shard in range(len(work.shards))
             for r in read_shard(work.shard_path("crop", shard))}
    for source_id, scene in by_id.items():
        record = crops[source_id]
        for box, crop in zip(record.boxes, record.crops):
            truth = next(o for o in scene.objects if o.noun == box.word)
            # The renderer crops from its 4x supersampled canvas, the builder from the 64 px image: the same
            # silhouette in the same place on white (IoU of the non-white pixels), up to resampling.
            ours, theirs = (np.asarray(crop) < 240).any(-1), (truth.crop < 240).any(-1)
            assert crop.size == truth.crop.shape[:2]
            assert (ours & theirs).sum() / (ours | theirs).sum() > 0.65, (source_id, box.word)
            offset = np.argwhere(ours).mean(0) - np.argwhere(theirs).mean(0)
            assert np.abs(offset).max() < 2.5, (source_id, box.word, offset)
    report = __import__("json").loads((tmp_path / "run" / "report.json").read_text())
    assert report["images_out"] == 6 and report["drops"]["filter"]["logit"] == 0
    assert sum(int(k) * v for k, v in report["subjects_per_image"].items()) == sum(
        len(set(o.noun for o in s.objects)) for s in scenes)
