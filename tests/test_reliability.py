"""Reliability, one test per class: a working `features validate`, no silent NaN, one-line errors for user
mistakes (CLI and API), run folders that are data and never code, and no surprises (warnings, batches, messages)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lambda_eclipse import cli as cli_module
from lambda_eclipse.checks import NonFiniteError, check_output_path, resolve_device
from lambda_eclipse.cli import GenerateArgs, generate, main
from lambda_eclipse.errors import UserError
from lambda_eclipse.features import FeatureDataset, synthesize_features
from lambda_eclipse.pipeline import LambdaEclipsePipeline
from lambda_eclipse.train import LoopSettings, OptimConfig, run_training
from lambda_eclipse.train.checkpoint import RunState, list_checkpoints


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "features"
    synthesize_features(path, num_samples=48, dim=16, max_text_len=20, seed=0)
    return path


def _tensor_bytes(path: Path, name: str | None = None) -> tuple[bytearray, int, int]:
    """(file bytes, start, end) of tensor ``name`` (default: the first) of a safetensors file."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    name = name or sorted(header, key=lambda k: header[k]["data_offsets"][0])[0]
    a, b = header[name]["data_offsets"]
    return data, 8 + n + a, 8 + n + b


def _copy_with_nan_target(store: Path, dst: Path, row: int) -> Path:
    shutil.copytree(store, dst)
    shard = sorted(dst.glob("shard-*.safetensors"))[0]
    data, start, _ = _tensor_bytes(shard, "target")
    dim = json.loads((dst / "index.json").read_text())["dim"]
    data[start + row * dim * 2 : start + row * dim * 2 + 2] = b"\x00\x7e"  # fp16 NaN
    shard.write_bytes(bytes(data))
    return dst


# ------------------------------------------------------------------------------------- 1. features validate
def test_features_validate_command_passes_good_and_fails_bad_stores(store, tmp_path, capsys):
    assert main(["features", "validate", str(store)]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")
    bad = _copy_with_nan_target(store, tmp_path / "bad", row=5)
    assert main(["features", "validate", str(bad)]) == 2
    captured = capsys.readouterr()
    assert "target holds NaN or inf (row 5)" in captured.out
    assert len(captured.err.strip().splitlines()) == 1 and "1 bad shard" in captured.err


# ------------------------------------------------------------------------------------- 2. no silent NaN
def test_a_nan_sample_stops_reading_naming_shard_tensor_and_sample(store, tmp_path):
    bad = FeatureDataset(_copy_with_nan_target(store, tmp_path / "bad", row=7))
    assert bad[6].target.isfinite().all()
    with pytest.raises(NonFiniteError, match=r"shard-00000.safetensors'?: target of sample 7 holds NaN"):
        bad[7]


@dataclass
class _Objective:
    """A one-weight regression whose loss turns NaN at ``nan_at`` (the data of that step is NaN)."""

    nan_at: int = 10**9

    def config_dict(self):
        return {"objective": {"kind": "toy"}}

    def check_resume(self, saved, output_dir):
        pass

    def build_model(self):
        return torch.nn.Linear(2, 1)

    def batches(self, state: RunState, accelerator):
        while True:
            x = torch.randn(4, 2, generator=state.generator)
            yield x * float("nan") if state.step + 1 == self.nan_at else x

    def losses(self, model, batch, state):
        return {"loss": model(batch).pow(2).mean()}

    def validate(self, model, accelerator):
        return None

    def export(self, model, output_dir):
        torch.save(model.state_dict(), output_dir / "model.pt")


def _settings(out: Path, steps: int = 3) -> LoopSettings:
    return LoopSettings(output_dir=str(out), max_steps=steps, checkpoint_every=1, progress=False,
                        optim=OptimConfig(lr=1e-2, warmup_steps=1, ema_decay=0.9))


def test_a_non_finite_loss_stops_training_before_it_is_saved(tmp_path):
    with pytest.raises(NonFiniteError, match="loss is not finite at step 2"):
        run_training(_Objective(nan_at=2), _settings(tmp_path))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"]
    assert not (tmp_path / "model.pt").exists()


def test_damaged_weights_and_nan_subjects_are_refused(model_dir, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(model_dir, damaged)
    weights = damaged / "unet" / "diffusion_pytorch_model.safetensors"
    data, start, end = _tensor_bytes(weights)
    data[start:end] = b"\xff" * (end - start)  # header intact, values NaN
    weights.write_bytes(bytes(data))
    with pytest.raises(NonFiniteError, match="the unet of .* weight .* holds NaN"):
        LambdaEclipsePipeline.from_pretrained(damaged)
    pipe = LambdaEclipsePipeline.from_pretrained(model_dir)
    with pytest.raises(NonFiniteError, match="subject 'dog' embedding holds NaN"):
        pipe("a dog", subjects={"dog": torch.full((pipe.embedding_dim,), float("nan"))}, output_type="embeds")


# ------------------------------------------------------------------------------------- 4. one line, not a traceback
@pytest.mark.parametrize("kwargs, error, message", [
    (dict(subjects=np.zeros(3)), TypeError, "subjects must map"),
    (dict(subjects=["dog"]), TypeError, "subjects must map"),
    (dict(subjects={3: "dog.png"}), TypeError, "must be a string"),
    (dict(prompt=None), TypeError, "prompt must be a string"),
    (dict(subjects={"dog": Image.new("RGB", (0, 0))}), ValueError, "is empty"),
    (dict(edge_image=Image.new("RGB", (8, 0))), ValueError, "is empty"),
    (dict(output_type="jpeg"), ValueError, "unknown output_type"),
    (dict(num_inference_steps=2.0), TypeError, "positive whole number"),
    (dict(guidance_scale=-3.0), ValueError, "0 or more"),
])
def test_api_mistakes_raise_clear_user_errors_before_any_work(tiny_pipe, monkeypatch, kwargs, error, message):
    monkeypatch.setattr(type(tiny_pipe), "_prior_embeddings", lambda *a, **k: pytest.fail("ran before checking"))
    call = {"prompt": "a dog", **kwargs}
    with pytest.raises(error, match=message) as raised:
        tiny_pipe(call.pop("prompt"), **call)
    assert isinstance(raised.value, UserError) and len(str(raised.value).splitlines()) == 1


def test_devices_and_output_paths_are_checked_in_one_place(tmp_path):
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None).type in ("cpu", "cuda", "mps")
    for bad, message in (("tpu", "unknown device"), ("cuda:99", "not available"), ("meta", "unsupported")):
        with pytest.raises(UserError, match=message):
            resolve_device(bad)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_output_path(tmp_path / "afile", "folder")
    with pytest.raises(UserError, match="is a folder"):
        check_output_path(tmp_path, "file")
    with pytest.raises(UserError, match="which is a file"):
        check_output_path(tmp_path / "afile" / "deeper" / "x.safetensors", "file")
    assert check_output_path(tmp_path / "new" / "deeper", "folder") == tmp_path / "new" / "deeper"


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory, model_dir, store) -> Path:
    """A file, a picture, a model folder without its UNet, a store with a truncated and one with a missing shard."""
    root = tmp_path_factory.mktemp("mistakes")
    (root / "afile").write_text("x")
    Image.new("RGB", (32, 32), "red").save(root / "dog.png")
    shutil.copytree(model_dir, root / "nounet")
    shutil.rmtree(root / "nounet" / "unet")
    for name, damage in (("trunc", "truncate"), ("missing", "delete")):
        shutil.copytree(store, root / name)
        shard = sorted((root / name).glob("shard-*"))[0]
        shard.write_bytes(shard.read_bytes()[:-10]) if damage == "truncate" else shard.unlink()
    return root


@pytest.mark.parametrize("argv, message", [
    (["encode-subject", "dog=DOG", "--out", "AFILE/x.safetensors"], "which is a file"),
    (["encode-subject", "dog=DOG", "--out", "x.safetensors", "--device", "cuda:99"], "not available"),
    (["generate", "a dog", "--device", "tpu"], "unknown device"),
    (["generate", "a dog", "--out", "AFILE/out"], "which is a file"),
    (["generate", "a dog", "--guidance", "-1"], "0 or more"),
    (["generate", "a dog", "--batch-size", "0"], "--batch-size"),
    (["generate", "a dog", "--model", "NOUNET"], "lacks its 'unet' component"),
    (["train-prior", "--output-dir", "AFILE"], "is a file"),
    (["train-prior", "--output-dir", "RUN", "data.train_dir=TRUNC"], "bytes, the index says"),
    (["train-prior", "--output-dir", "RUN", "data.train_dir=MISSING"], "is missing"),
    (["features", "synth", "--out", "AFILE", "--num-samples", "4"], "is a file"),
    (["features", "synth", "--out", "AFILE/store", "--num-samples", "4"], "which is a file"),
])
def test_cli_mistakes_are_one_line(argv, message, model_dir, store, mistakes, tmp_path, capsys):
    subs = {"DOG": mistakes / "dog.png", "AFILE": mistakes / "afile", "NOUNET": mistakes / "nounet",
            "RUN": tmp_path / "run", "TRUNC": mistakes / "trunc", "MISSING": mistakes / "missing"}

    def fill(arg: str) -> str:
        for key, value in sorted(subs.items(), key=lambda kv: -len(kv[0])):
            arg = arg.replace(key, str(value))
        return arg

    argv = [fill(a) for a in argv]
    if argv[0] in ("generate", "encode-subject") and "--model" not in argv:
        argv += ["--model", str(model_dir)]
    if argv[0] == "train-prior":  # options first, then the section.key=value overrides
        overrides = [a for a in argv[1:] if "=" in a] or [f"data.train_dir={store}"]
        argv = [a for a in argv if "=" not in a] + ["--max-steps", "2"] + overrides + [
            "data.num_workers=0", "data.batch_size=8", "model.embedding_dim=16", "model.num_embeddings=20",
            "model.num_layers=1", "model.num_attention_heads=2", "model.attention_head_dim=8", "log_with=none",
            "val_every=0", "progress=false"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err


# ------------------------------------------------------------------------------------- 5. run folders are data
class _RunsCode:
    def __reduce__(self):
        return (os.makedirs, (os.environ["L18_MARKER"],))


def test_resume_never_unpickles_and_model_code_is_never_trusted(tmp_path, monkeypatch, model_dir):
    run_training(_Objective(), _settings(tmp_path, steps=4), stop_after=2)
    resumed = run_training(_Objective(), _settings(tmp_path, steps=4))
    assert resumed.complete and resumed.step == 4
    checkpoint = list_checkpoints(tmp_path)[-1]
    assert not list(checkpoint.glob("custom_checkpoint_*"))  # run state is safetensors + JSON
    assert {"schedule.json", "ema.safetensors", "run_state_0.json"} <= {p.name for p in checkpoint.iterdir()}
    # someone else's run folder: a pickle that runs code when loaded is refused, and nothing runs
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("L18_MARKER", str(marker))
    with open(checkpoint / "custom_checkpoint_0.pkl", "wb") as handle:
        pickle.dump({"x": _RunsCode()}, handle)
    with pytest.raises(UserError, match="never loads"):
        run_training(_Objective(), _settings(tmp_path, steps=6))
    (checkpoint / "custom_checkpoint_0.pkl").unlink()
    torch.save({"x": _RunsCode()}, checkpoint / "optimizer.bin")
    with pytest.raises(UserError, match="not plain tensors"):
        run_training(_Objective(), _settings(tmp_path, steps=6))
    assert not marker.exists()
    with pytest.raises(UserError, match="trust_remote_code is not supported"):
        LambdaEclipsePipeline.from_pretrained(model_dir, trust_remote_code=True)


# ------------------------------------------------------------------------------------- 6. no surprises
def test_generate_batches_write_as_they_go_and_match_one_batch(tiny_pipe, tmp_path, monkeypatch):
    calls, seen = [], []
    monkeypatch.setattr(cli_module, "load_pipeline", lambda *a, **k: tiny_pipe)  # in memory: no load per call
    real = LambdaEclipsePipeline.__call__

    def counting(self, *args, **kwargs):
        calls.append((kwargs["num_images_per_prompt"], len(seen)))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LambdaEclipsePipeline, "__call__", counting)
    args = dict(prompt="a dog", num_images=3, steps=1, model="tiny", progress=False, height=8, width=8)
    batched = generate(GenerateArgs(**args, out=str(tmp_path / "b"), batch_size=2), on_saved=seen.append)
    assert calls == [(2, 0), (1, 2)] and seen == batched  # each batch written before the next starts
    whole = generate(GenerateArgs(**args, out=str(tmp_path / "w"), batch_size=8))
    assert [p.name for p in batched] == [p.name for p in whole]
    for a, b in zip(batched, whole):
        assert np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b), np.int16)).max() <= 1


def test_float16_on_cpu_loads_without_the_false_warning(model_dir):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers")  # it does not propagate to the root logger
    diffusers_logger.addHandler(handler)
    try:
        pipe = cli_module.load_pipeline(str(model_dir), "cpu", "float16")
    finally:
        diffusers_logger.removeHandler(handler)
    assert pipe.unet.dtype == torch.float16
    assert not [r for r in records if "will fail" in r.getMessage()]


def test_no_bundled_model_and_no_cached_hub_stack_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.delenv("LAMBDA_ECLIPSE_MODEL", raising=False)
    monkeypatch.setattr(cli_module, "BUNDLED_MODEL", tmp_path / "absent")
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)
    with pytest.raises(UserError, match="no bundled model .* pass --model"):
        cli_module.resolve_model(None)
    assert cli_module.resolve_model("some/model") == "some/model"
