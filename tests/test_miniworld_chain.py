"""The whole miniature chain, reduced: build (components, features, prior via train-prior, oracle, bundle), then
eval and generate on the bundle through the same commands users run."""

import json

import pytest

import torch
from safetensors import safe_open

from lambda_eclipse import LambdaEclipsePipeline
from lambda_eclipse.cli import main


@pytest.mark.slow  # a whole build or install: the slow tier (CI runs it)
def test_reduced_build_eval_and_generate(smoke_build, tmp_path):
    out = smoke_build  # `miniworld build --smoke --install <out>/../smoke-installed`, shared with other tests
    installed = out.parent / "smoke-installed"
    bundle = out / "bundle"
    for part in ["prior", "text_encoder", "tokenizer", "image_encoder", "image_processor", "unet", "scheduler", "movq"]:
        assert (bundle / part).is_dir(), part
    pipe = LambdaEclipsePipeline.from_pretrained(installed)
    assert (out.parent / "smoke-installed-oracle" / "oracle.json").is_file()  # the judge is installed beside the model
    assert pipe.prior.config.embedding_dim == pipe.image_encoder.config.projection_dim
    # the UNet is stored in float16 (half the bundle's disk) and loads as float32 without a torch_dtype
    with safe_open(str(bundle / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F16"}
    assert pipe.unet.dtype == torch.float32 and pipe.prior.dtype == torch.float32
    # Rerunning resumes: every stage is complete and skipped, no trained component is rewritten.
    trained = [out / "components-build" / "components", out / "priors", out / "oracle"]
    stamps = {p: p.stat().st_mtime_ns for d in trained for p in d.rglob("*") if p.is_file()}
    assert len(stamps) > 10
    assert main(["miniworld", "build", "--smoke", "--out", str(out)]) == 0
    assert stamps == {p: p.stat().st_mtime_ns for d in trained for p in d.rglob("*") if p.is_file()}

    assert main(["miniworld", "eval", "--model", str(bundle), "--oracle", str(out.parent / "smoke-installed-oracle"), "--out",
                 str(tmp_path / "eval"), "--num-prompts", "4", "--steps", "2", "--images-per-prompt", "1"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_prompts"] == 4 and metrics["oracle_movq_matches"] is True  # the build's judge saw this MoVQ
    assert (tmp_path / "eval" / "grid.png").stat().st_size > 0
    assert "|" in (tmp_path / "eval" / "metrics.md").read_text()

    crop = tmp_path / "ball.png"
    from lambda_eclipse.miniworld import render_scene
    from PIL import Image

    scene = render_scene(3)
    Image.fromarray(scene.objects[0].crop).save(crop)
    word = scene.objects[0].noun
    assert main(["generate", f"a {word} on a plain red background", "--subject", f"{word}={crop}", "--model",
                 str(bundle), "--out", str(tmp_path / "gen"), "--steps", "2", "--quiet"]) == 0
    assert len(list((tmp_path / "gen").glob("*.png"))) == 1


def test_prior_runs_are_shared_between_lanes_by_claims(tmp_path, monkeypatch):
    from lambda_eclipse.miniworld import bundle

    trained = []
    monkeypatch.setattr(bundle, "train_miniworld_prior", lambda train, val, run, lam, overrides: trained.append(
        (run.name, lam, "max_steps=1000" in overrides)))
    plan = bundle.MiniworldBuild()
    assert bundle._claim(tmp_path, "sweep-lambda-0.0", "second")  # the other lane is on it
    assert not bundle._claim(tmp_path, "sweep-lambda-0.0", "first")
    done = tmp_path / "priors" / "sweep-lambda-0.5" / "prior"
    done.mkdir(parents=True)
    (done / "config.json").write_text("{}")  # finished earlier: skipped without a claim
    bundle._train_claimed_priors(tmp_path, plan, "first", lambda message: None)
    assert trained == [("lambda-0.2", 0.2, False), ("sweep-lambda-0.2", 0.2, True)]
    bundle._train_claimed_priors(tmp_path, plan, "second", lambda message: None)  # nothing left for a second pass
    assert len(trained) == 2
