"""The miniature-world eval harness end to end on a tiny random pipeline and a few-step oracle (plumbing only:
the numbers mean nothing here)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import DIM, tiny_pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from lambda_eclipse.miniworld.evaluate import (
    BUCKETS,
    CONDITIONS,
    EvalConfig,
    eval_scenes,
    run_miniworld_eval,
)
from lambda_eclipse.miniworld.oracle import load_oracle
from lambda_eclipse.miniworld.oracle_train import train_oracle
from lambda_eclipse.miniworld.vocab import miniworld_tokenizer

CFG = EvalConfig(images_per_prompt=2, num_inference_steps=2, batch=8, grid_rows=4)


@pytest.fixture(scope="module")
def world_pipe():
    """The tiny random pipeline, speaking the miniature world's word-level vocabulary."""
    torch.set_num_threads(1)
    pipe = tiny_pipeline()
    pipe.tokenizer = miniworld_tokenizer()
    torch.manual_seed(1)
    pipe.text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(pipe.tokenizer), hidden_size=DIM, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32, projection_dim=DIM, bos_token_id=0, eos_token_id=1,
        pad_token_id=1,
    )).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def oracle_dir(tmp_path_factory):
    return train_oracle(tmp_path_factory.mktemp("oracle") / "oracle", size=16, steps=3, batch=8, scenes=24,
                        eval_scenes=0)


def test_eval_scenes_are_balanced_heldout():
    scenes = eval_scenes(7, seed=0, size=16)
    counts = [sum(len(s.objects) == n for s in scenes) for n in (1, 2, 3)]
    assert counts == [3, 2, 2]
    assert all(s.split == "heldout" and any(o.heldout for o in s.objects) for s in scenes)


def test_run_writes_reports_with_counts(world_pipe, oracle_dir, tmp_path):
    prior_dir = tmp_path / "prior-b"
    world_pipe.prior.save_pretrained(prior_dir)
    m = run_miniworld_eval(world_pipe, oracle_dir, tmp_path / "out", num_prompts=6, seed=0,
                           priors={"λ=b": prior_dir}, config=CFG)
    for name in ("metrics.json", "metrics.md", "grid.png"):
        assert (tmp_path / "out" / name).is_file()
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["num_prompts"] == 6
    assert m["prompts_by_subjects"] == {"1": 2, "2": 2, "3": 2} and m["images_per_condition"] == 12
    subjects = 2 * (2 * 1 + 2 * 2 + 2 * 3)  # images per prompt × subjects over all prompts
    for cond in CONDITIONS:
        c = m["conditions"][cond]
        assert set(c["colour"]) == set(BUCKETS)
        assert c["colour"]["all"]["n"] == subjects and c["clip_i_render"]["all"]["n"] == 12
        assert c["all_colours_right"]["2"]["n"] == 4 and "1" not in c["all_colours_right"]
        assert c["relation"]["all"]["n"] == 2 * (2 * 1 + 2 * 2)
        for key in ("texture", "dino_subject"):  # one value per subject of every image
            assert c[key]["all"]["n"] == subjects and np.isfinite(c[key]["all"]["mean"])
        for key in ("background_colour", "background_kind", "clip_t"):  # one value per image
            assert c[key]["all"]["n"] == 12 and np.isfinite(c[key]["all"]["mean"])
    assert m["conditions"]["render"]["clip_i_render"]["all"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert set(m["decoder_fidelity"]) == {"render", "gt_embedding"}
    assert m["decoder_fidelity"]["gt_embedding"]["n_images"] == 12
    # the swept prior is the pipeline's own prior: its with-subject images are the same images
    assert m["lambda_sweep"]["λ=b"]["metrics"] == m["conditions"]["with_subjects"]
    assert m["timing"]["images_decoded"] == 5 * 12 and m["timing"]["seconds_per_100_images"] > 0
    md = (tmp_path / "out" / "metrics.md").read_text()
    assert "λ sweep" in md and "both subjects' colours right" in md and "DINO-like" in md
    assert md.count(" found | ") >= 3  # the decoder-fidelity rows per shape (6 prompts hold at least 3 shapes)
    grid = Image.open(tmp_path / "out" / "grid.png")
    assert grid.height > 4 * 16 and grid.width > 6 * 16


def test_same_seed_same_metrics(world_pipe, oracle_dir, tmp_path):
    oracle = load_oracle(oracle_dir)
    a = run_miniworld_eval(world_pipe, oracle, tmp_path / "a", num_prompts=3, seed=4, config=CFG)
    b = run_miniworld_eval(world_pipe, oracle, tmp_path / "b", num_prompts=3, seed=4, config=CFG)
    assert a["conditions"] == b["conditions"]


def test_cli_entry_loads_a_saved_model(world_pipe, oracle_dir, tmp_path, capsys):
    from lambda_eclipse.cli import main

    world_pipe.save_pretrained(tmp_path / "model")
    args = ["miniworld", "eval", "--model", str(tmp_path / "model"), "--oracle", str(oracle_dir), "--out",
            str(tmp_path / "out"), "--num-prompts", "3", "--images-per-prompt", "1", "--steps", "2"]
    assert main(args) == 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["images_per_condition"] == 3 and (tmp_path / "out" / "metrics.md").is_file()
    assert m["oracle_movq_matches"] is None  # this oracle trained without MoVQ reconstructions
    capsys.readouterr()
    assert main(args + ["--prior", "no-equals-sign"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "LABEL=DIR" in err[0]


def test_grid_labels_are_drawable_by_the_default_font():
    from lambda_eclipse.miniworld.evaluate_report import _drawable

    assert _drawable("λ=0.2") == "lambda=0.2"
    assert _drawable("a ball") == "a ball"
    _drawable("λ→x").encode("latin-1")  # whatever is left is in the font's range
