"""The Ray engine on a local Ray instance writes the same stage shards and feature store as the local one.

Fast tier: a local build's first six stages are handed to the Ray engine, which runs ``features`` (a model stage in
an actor pool with the tiny CLIP, the driver writing the store) over three real photos and a corrupt file; its
shards and store must equal the local engine's. A Ray instance costs seconds to start and each actor seconds of
imports, so the fast test runs one stage. Slow tier: every stage on Ray, from nothing (model stages as actors, the
others as tasks).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lambda_eclipse.dataset import build_dataset
from lambda_eclipse.dataset.records import read_shard
from lambda_eclipse.features import load_all

# Ray starts its own processes: one test at a time holds a Ray instance, on one xdist worker.
pytestmark = pytest.mark.xdist_group("ray")
STORE_TENSORS = ("token_states", "token_offsets", "token_subject", "pooled_text", "target", "subject_embeds",
                 "subject_offsets", "edge", "edge_index")


def _same_shards(stage: str, a, b) -> None:
    """The two runs' shard files of ``stage``: the same records (scalars, masks, crop pixels)."""
    files = sorted(p.name for p in (a / "stages" / stage).glob("shard-*.jsonl"))
    assert files and files == sorted(p.name for p in (b / "stages" / stage).glob("shard-*.jsonl"))
    for name in files:
        ra, rb = read_shard(a / "stages" / stage / name), read_shard(b / "stages" / stage / name)
        assert [r.scalars() for r in ra] == [r.scalars() for r in rb], (stage, name)
        for x, y in zip(ra, rb):
            assert [m.tolist() for m in x.masks] == [m.tolist() for m in y.masks]
            assert [list(c.getdata()) for c in x.crops] == [list(c.getdata()) for c in y.crops]


def _same_store(a, b) -> None:
    """Bit for bit: both engines run the same functions with one torch thread (xdist workers and Ray actors)."""
    x, y = load_all(a / "features"), load_all(b / "features")
    assert len(x) >= 1 and list(x.source_ids) == list(y.source_ids) and list(x.captions) == list(y.captions)
    for name in STORE_TENSORS:
        assert torch.equal(getattr(x, name), getattr(y, name)), name
    ra, rb = (json.loads((p / "report.json").read_text()) for p in (a, b))
    assert ra["drops"] == rb["drops"] and ra["subjects_per_image"] == rb["subjects_per_image"]
    assert ra["unreadable"] == rb["unreadable"] and len(rb["unreadable"]) >= 1


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The local engine computes with one thread, as each Ray actor does, so the floats can be compared bitwise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ray_engine_finishes_a_local_build_to_the_same_shards_and_store(tmp_path):
    import ray  # the test extra installs Ray and spaCy: no quiet skip
    from dataset_tiny import tiny_models
    from test_dataset_build import PHOTOS, config, make_inputs

    inputs = make_inputs(tmp_path / "photos")
    for name in [f"{noun}.*" for _, noun in PHOTOS[3:]] + ["truncated.*", "zcmyk.*", "zdeep16.*"]:
        for path in inputs.glob(name):
            path.unlink()  # three photos and the corrupt file: a few images, one unreadable
    models = tiny_models()
    local = build_dataset(config(inputs, tmp_path / "local", "shard_size=2"), models).parent
    remote = tmp_path / "ray"
    remote.mkdir()
    for name in ("sources.jsonl", "input.json"):
        shutil.copy(local / name, remote / name)
    manifest = json.loads((local / "manifest.json").read_text())
    del manifest["stats"]["features"]  # the stage the Ray engine runs, and records again
    (remote / "manifest.json").write_text(json.dumps(manifest))
    for stage in ("caption", "nouns", "ground", "segment", "filter", "crop"):  # done by the local engine
        shutil.copytree(local / "stages" / stage, remote / "stages" / stage)
    try:
        build_dataset(config(inputs, remote, "shard_size=2", "engine=ray", "ray.num_cpus=1"), models)
    finally:
        ray.shutdown()
    assert json.loads((remote / "manifest.json").read_text())["stats"]["features"].keys() == {"0", "1"}  # both shards
    _same_shards("features", local, remote)
    _same_store(local, remote)


@pytest.mark.slow
def test_ray_engine_equals_local_engine(tmp_path):
    import ray  # the test extra installs Ray and spaCy: no quiet skip
    from dataset_tiny import tiny_models
    from test_dataset_build import config, make_inputs

    inputs = make_inputs(tmp_path / "photos")
    models = tiny_models()
    local = build_dataset(config(inputs, tmp_path / "local"), models).parent
    try:
        remote = build_dataset(config(inputs, tmp_path / "ray", "engine=ray", "ray.num_cpus=2"), models).parent
    finally:
        ray.shutdown()
    for stage in ("caption", "nouns", "ground", "segment", "filter", "crop", "features"):
        _same_shards(stage, local, remote)
    _same_store(local, remote)
    assert len(json.loads((remote / "report.json").read_text())["unreadable"]) == 2
