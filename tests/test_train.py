"""Prior trainer: configs, loss going down, exact resume, and the exported prior (the shared binding: test_binding)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lambda_eclipse import LambdaEclipsePipeline, LambdaEclipsePrior, UserError
from lambda_eclipse.features import synthesize_features
from lambda_eclipse.train import load_config, train_prior
from released_prior import ReleasedPrior

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("features") / "synth"
    synthesize_features(path, num_samples=256, dim=32, max_text_len=32, seed=0)
    return path


def tiny_config(store, out, extra=(), **top):
    overrides = [
        f"data.train_dir={store}", "data.batch_size=16", "data.val_samples=32", "data.num_workers=0",
        "model.num_attention_heads=2", "model.attention_head_dim=8", "model.num_layers=1", "model.embedding_dim=32",
        "model.num_embeddings=77", "optim.lr=3e-3", "optim.warmup_steps=2", "optim.ema_decay=0.9",
        "mixed_precision=no", "log_with=none", "progress=false", "val_every=4", "log_every=2", *extra,
    ]
    return load_config(None, overrides, output_dir=str(out), **top)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "prior" / "diffusion_pytorch_model.safetensors"))


def test_shipped_configs_parse():
    from lambda_eclipse.miniworld.prior_stage import CONFIG as MINIWORLD_PRIOR

    shipped = sorted((ROOT / "configs").glob("prior-*.yaml")) + [MINIWORLD_PRIOR]  # the last one is package data
    assert len(shipped) == 3
    for path in shipped:
        config = load_config(path)
        assert config.max_steps > 0
    paper = load_config(ROOT / "configs" / "prior-paper.yaml")
    assert (paper.data.batch_size, paper.optim.lr, paper.loss.lambda_contrastive) == (512, 5e-5, 0.2)


@pytest.mark.parametrize(
    "overrides, message",
    [(["optim.lrr=1"], "unknown config key 'optim.lrr'"), (["optim.lr"], "malformed override"),
     (["max_steps=abc"], "needs a int"), (["data.batch_size=1"], "at least 2")],
)
def test_config_errors(store, overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [f"data.train_dir={store}"] + overrides)


def test_loss_goes_down_and_export_loads(store, tmp_path, tiny_pipe):
    config = tiny_config(store, tmp_path / "run", max_steps=24, log_with="tensorboard")
    train_prior(config)
    run = tmp_path / "run"
    scalars = sorted((run / "logs").rglob("events.out.tfevents*"))
    assert scalars, "tensorboard logs are written"
    first, last = _val_losses(run)
    assert last < first
    # The exported prior loads in the pipeline and, by parameter names, in the released class.
    prior = LambdaEclipsePrior.from_pretrained(run / "prior")
    ReleasedPrior(num_attention_heads=2, attention_head_dim=8, num_layers=1, embedding_dim=32).load_state_dict(
        prior.state_dict(), strict=True)
    components = dict(tiny_pipe.components, prior=prior)
    pipe = LambdaEclipsePipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a dog on the beach", num_inference_steps=1, output_type="np")
    assert out.images.shape == (1, 16, 16, 3)


def _val_losses(run: Path) -> tuple[float, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((run / "logs").rglob("events.out.tfevents*")).parent))
    acc.Reload()
    values = [e.value for e in acc.Scalars("val/loss")]
    return values[0], values[-1]


@pytest.mark.parametrize("streaming", [False, True])
def test_interrupted_run_resumes_bitwise(store, tmp_path, streaming):
    def config(out):
        extra = [f"data.streaming={streaming}"] + ([f"data.val_dir={store}"] if streaming else [])
        return tiny_config(store, out, extra, max_steps=8, checkpoint_every=3)

    full = tmp_path / "full"
    train_prior(config(full))
    parts = tmp_path / "parts"
    train_prior(config(parts), stop_after=4)
    assert not (parts / "prior").exists()  # an interrupted run exports nothing
    train_prior(config(parts))
    a, b = weights(full), weights(parts)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigkilled_subprocess_resumes_bitwise(store, tmp_path):
    """`lambda-eclipse train-prior` killed with SIGKILL after a checkpoint, then rerun, equals an uninterrupted run."""
    args = [f"data.train_dir={store}", "data.batch_size=16", "data.val_samples=32", "data.num_workers=0",
            "model.num_attention_heads=2", "model.attention_head_dim=8", "model.num_layers=1",
            "model.embedding_dim=32", "mixed_precision=no", "log_with=none", "progress=false", "optim.warmup_steps=2"]

    def command(out):
        return [sys.executable, "-m", "lambda_eclipse.cli", "train-prior", "--output-dir", str(out),
                "--max-steps", "40", "--checkpoint-every", "5", *args]

    subprocess.run(command(tmp_path / "full"), check=True, capture_output=True)
    victim = subprocess.Popen(command(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "checkpoints" / "step-000010").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "prior").exists(), "killed too late to test resuming"
    subprocess.run(command(tmp_path / "killed"), check=True, capture_output=True)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
