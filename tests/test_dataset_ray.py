"""The Ray engine on a local 2-CPU Ray instance writes the same stage shards and feature store as the local one."""

from __future__ import annotations

import json

import pytest
import torch

from lambda_eclipse.dataset import build_dataset
from lambda_eclipse.features import load_all

pytestmark = pytest.mark.slow


def test_ray_engine_equals_local_engine(tmp_path):
    ray = pytest.importorskip("ray")
    pytest.importorskip("spacy")
    from dataset_tiny import tiny_models
    from test_dataset_build import config, make_inputs

    inputs = make_inputs(tmp_path / "photos")
    models = tiny_models()
    local = build_dataset(config(inputs, tmp_path / "local"), models)
    try:
        remote = build_dataset(config(inputs, tmp_path / "ray", "engine=ray", "ray.num_cpus=2"), models)
    finally:
        ray.shutdown()
    a, b = load_all(local), load_all(remote)
    assert len(a) >= 1 and list(a.source_ids) == list(b.source_ids)
    for key in ("target", "subject_embeds", "token_states", "edge", "token_subject"):
        assert torch.allclose(getattr(a, key).float(), getattr(b, key).float(), atol=1e-3), key
    ra, rb = (json.loads((p.parent / "report.json").read_text()) for p in (local, remote))
    assert ra["drops"] == rb["drops"] and ra["subjects_per_image"] == rb["subjects_per_image"]
    assert ra["unreadable"] == rb["unreadable"] and len(rb["unreadable"]) == 2
