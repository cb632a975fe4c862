"""The dataset builder end to end on real DreamBench photos with tiny random-weight models: stages, resume,
rerunning a later stage alone, bad inputs skipped and listed, the report, and a store the trainer reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lambda_eclipse.dataset import build_dataset, load_build_config
from lambda_eclipse.dataset.records import read_shard
from lambda_eclipse.features import load_all, read_index, validate_feature_store

# Six of the DreamBench photos the repository ships (tests/data/dreambench, CC-BY-4.0), each captioned with a noun
# of the tiny spaCy vocabulary: the tiny models are random, so what matters is real JPEGs of real sizes.
DREAMBENCH = Path(__file__).resolve().parent / "data" / "dreambench"
PHOTOS = [("dog6/00.jpg", "dog"), ("cat/00.jpg", "cat"), ("vase/00.jpg", "backpack"), ("red_cartoon/00.jpg", "candle"),
          ("cat/01.jpg", "clock"), ("dog6/01.jpg", "can")]


def make_inputs(folder: Path) -> Path:
    """Six DreamBench photos with sidecar captions, plus one of each awkward input."""
    folder.mkdir(parents=True)
    for photo, noun in PHOTOS:
        shutil.copy(DREAMBENCH / photo, folder / f"{noun}.jpg")
        (folder / f"{noun}.txt").write_text(f"a photo of a {noun} on the beach")
    data = (folder / "dog.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "truncated.txt").write_text("a dog")
    (folder / "corrupt.png").write_bytes(b"not an image at all")
    rgb = np.asarray(Image.open(folder / "cat.jpg"))
    Image.fromarray(rgb).convert("CMYK").save(folder / "zcmyk.jpg")
    (folder / "zcmyk.txt").write_text("a cat wearing a hat")
    deep = (rgb.mean(axis=-1) * 257).astype(np.uint16)
    Image.fromarray(deep).save(folder / "zdeep16.png")  # 16-bit greyscale
    (folder / "zdeep16.txt").write_text("a photo of a cat")
    return folder


OVERRIDES = [
    "models.captioner=none", "shard_size=4", "store_shard_size=64", "progress=false", "report_samples=3",
    "stages.box_threshold=0.0", "stages.text_threshold=0.0", "stages.crop_size=32",
    "filter.min_side=256", "filter.max_boxes=10", "filter.max_identical=10", "filter.max_white_share=1.0",
    "filter.box_ratio_min=0.0", "filter.box_ratio_max=1.0", "filter.min_logit=0.0", "filter.min_mask_share=0.0",
]


@pytest.fixture(scope="module")
def models():
    pytest.importorskip("spacy")
    from dataset_tiny import tiny_models

    return tiny_models()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs") / "photos")


def config(inputs, out, *extra):
    return load_build_config(None, [f"input.path={inputs}", f"output_dir={out}", *OVERRIDES, *extra])


@pytest.fixture(scope="module")
def built(inputs, models, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "run"
    return build_dataset(config(inputs, out), models).parent


def test_build_writes_a_valid_store_and_report(built, inputs):
    store = built / "features"
    report = validate_feature_store(store)
    assert report.ok and report.num_samples >= 1
    summary = json.loads((built / "report.json").read_text())
    assert summary["images_in"] == 10
    assert {u["source_id"] for u in summary["unreadable"]} == {"truncated.jpg", "corrupt.png"}
    assert summary["images_out"] == report.num_samples == read_index(store).num_samples
    assert sum(summary["subjects_per_image"].values()) == summary["images_out"]
    assert set(summary["drops"]["filter"]) >= {"min_resolution", "box_count", "logit", "mask_share", "subjects"}
    assert summary["throughput"]["ground"]["images"] == 8  # the two unreadable inputs never reach a model
    assert (built / "samples.png").stat().st_size > 1000
    assert "| subjects | images |" in (built / "report.md").read_text()
    block = load_all(store)
    ids = set(block.source_ids)
    assert "zcmyk.jpg" in ids or "zdeep16.png" in ids or summary["drops"]["filter"]["subjects"] > 0
    # Every stored subject is bound to its word in the caption, by the one binding function.
    for i in range(len(block)):
        sample = block.sample(i)
        assert sample.num_subjects >= 1 and int(sample.token_subject.max()) == sample.num_subjects - 1
        assert sample.edge is not None


def test_crops_are_square_subject_crops(built):
    records = [r for r in read_shard(built / "stages" / "crop" / "shard-00000.jsonl") if not r.dropped]
    assert records and all(len(r.crops) == len(r.boxes) >= 1 for r in records)
    assert all(crop.size == (32, 32) for r in records for crop in r.crops)


@pytest.mark.slow
def test_rerun_is_a_no_op_and_a_new_threshold_reruns_only_the_later_stages(built, inputs, models, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(built, out)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "stages" / "ground").glob("*.jsonl")}
    build_dataset(config(inputs, out), models)
    assert torch.equal(load_all(out / "features").target, load_all(built / "features").target)
    build_dataset(config(inputs, out, "filter.min_side=600"), models)  # 512 px photos: every image dropped now
    after = {p.name: p.stat().st_mtime_ns for p in (out / "stages" / "ground").glob("*.jsonl")}
    assert after == before  # ground was not rerun
    summary = json.loads((out / "report.json").read_text())
    assert summary["images_out"] == 0 and summary["drops"]["filter"]["min_resolution"] == 8
    assert read_index(out / "features").num_samples == 0


@pytest.mark.slow
def test_resume_after_losing_the_last_shards_gives_the_same_store(built, inputs, models, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(built, out)
    # What a kill leaves: the last shard of segment and everything after it missing, the store short of it.
    for stage in ("segment", "filter", "crop", "features"):
        for f in (out / "stages" / stage).glob("shard-00002.*"):
            f.unlink()
    index = json.loads((out / "features" / "index.json").read_text())
    if len(index["shards"]) > 1:
        (out / "features" / index["shards"][-1]["file"]).unlink()
        index["shards"] = index["shards"][:-1]
        (out / "features" / "index.json").write_text(json.dumps(index))
    build_dataset(config(inputs, out), models)
    a, b = load_all(out / "features"), load_all(built / "features")
    assert list(a.source_ids) == list(b.source_ids)
    assert torch.allclose(a.target, b.target) and torch.allclose(a.subject_embeds, b.subject_embeds)


def test_prior_trains_on_a_built_store(built, tmp_path):
    from lambda_eclipse.train import load_config, train_prior

    index = read_index(built / "features")
    cfg = load_config(None, [f"data.train_dir={built / 'features'}", f"data.val_dir={built / 'features'}",
                             "data.batch_size=2", "data.num_workers=0", f"model.embedding_dim={index.dim}",
                             f"model.num_embeddings={index.max_text_len}", "model.num_layers=1",
                             "model.num_attention_heads=2", "model.attention_head_dim=8", "optim.warmup_steps=1",
                             "val_every=0", "log_with=none", "progress=false", "mixed_precision=no"],
                      output_dir=str(tmp_path / "prior"), max_steps=2, checkpoint_every=2)
    exported = train_prior(cfg) / "prior"
    assert (exported / "config.json").is_file()


KILLED_BUILD = """
import sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from dataset_tiny import tiny_models
from test_dataset_build import config
from lambda_eclipse.dataset import build_dataset
build_dataset(config({inputs!r}, {out!r}, "shard_size=2"), tiny_models())
"""


@pytest.mark.slow
def test_a_sigkilled_build_rerun_gives_the_same_store(inputs, models, tmp_path):
    """Kill the build with SIGKILL right after its first feature-store shard, rerun it, compare with a clean run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    script = KILLED_BUILD.format(tests=str(Path(__file__).parent), inputs=str(inputs), out=str(out))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-c", script], env=env)
    first_store_shard = out / "features" / "shard-00000.safetensors"
    deadline = time.time() + 600
    while process.poll() is None and not first_store_shard.exists() and time.time() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the build finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "report.json").exists()
    build_dataset(config(inputs, out, "shard_size=2"), models)
    clean = build_dataset(config(inputs, tmp_path / "clean", "shard_size=2"), models)
    a, b = load_all(out / "features"), load_all(clean)
    assert list(a.source_ids) == list(b.source_ids) and len(set(a.source_ids)) == len(a)
    assert torch.allclose(a.target, b.target) and torch.allclose(a.token_states, b.token_states)
    assert json.loads((out / "report.json").read_text())["images_out"] == len(b)


@pytest.mark.slow
def test_the_command_loads_every_model_from_folders(inputs, tmp_path, capsys):
    """`lambda-eclipse build-dataset` with the stage models saved as folders (the Hub-id path, offline)."""
    from dataset_tiny import tiny_captioner, tiny_detector, tiny_segmenter, tiny_spacy

    from lambda_eclipse.cli import BUNDLED_MODEL, main

    folders = {}
    for name, bundle in (("captioner", tiny_captioner()), ("detector", tiny_detector()), ("segmenter", tiny_segmenter())):
        folders[name] = tmp_path / name
        bundle.model.save_pretrained(folders[name])
        bundle.processor.save_pretrained(folders[name])
    tiny_spacy().to_disk(tmp_path / "spacy")
    out = tmp_path / "run"
    args = [f"input.path={inputs}", f"output_dir={out}", *OVERRIDES, f"models.spacy={tmp_path / 'spacy'}",
            f"models.detector={folders['detector']}", f"models.segmenter={folders['segmenter']}",
            f"models.clip={BUNDLED_MODEL}", "models.device=cpu"]
    assert main(["build-dataset", *args]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.md")
    assert validate_feature_store(out / "features").ok
    assert read_index(out / "features").metadata["models"]["detector"] == str(folders["detector"])
    # BLIP-2 from its folder replaces the captions (random words here, so the later stages find little).
    again = [a.replace("models.captioner=none", f"models.captioner={folders['captioner']}") for a in args]
    assert main(["build-dataset", *[a.replace(str(out), str(tmp_path / "run2")) for a in again], "--stages",
                 "caption"]) == 0
    captions = [r.caption for r in read_shard(tmp_path / "run2" / "stages" / "caption" / "shard-00000.jsonl")
                if not r.dropped]
    assert captions and not any(c.startswith("a photo of") for c in captions)
