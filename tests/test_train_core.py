"""The one training core: schedules, EMA, resume refusal, and the Eq. 2 decoder objective on a tiny UNet."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from tiny import K22_SCHEDULER

from lambda_eclipse.errors import UserError
from lambda_eclipse.train import LoopSettings, OptimConfig, run_training
from lambda_eclipse.train.checkpoint import list_checkpoints
from lambda_eclipse.train.core import make_schedule
from lambda_eclipse.train.decoder import DecoderObjective, DecoderObjectiveConfig


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=8, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", addition_embed_type="image", encoder_hid_dim=8,
        encoder_hid_dim_type="image_proj", cross_attention_dim=16, attention_head_dim=8,
        resnet_time_scale_shift="scale_shift", norm_num_groups=8,
    )


def decoder_objective(tmp_path: Path, prediction_type: str = "v_prediction", **config) -> DecoderObjective:
    g = torch.Generator().manual_seed(0)
    latents, embeds = torch.randn(12, 4, 4, 4, generator=g), torch.randn(12, 8, generator=g)
    scheduler = DDPMScheduler.from_config({**K22_SCHEDULER, "prediction_type": prediction_type})
    return DecoderObjective(tiny_unet, scheduler, latents, embeds, torch.zeros(1, 8),
                            DecoderObjectiveConfig(batch_size=4, **config), export_to=tmp_path / "export",
                            settings={"unet": "tiny"})


def settings(out: Path, steps: int = 4, **optim) -> LoopSettings:
    return LoopSettings(output_dir=str(out), max_steps=steps, checkpoint_every=2, progress=False,
                        optim=OptimConfig(lr=1e-3, warmup_steps=1, **optim))


def test_cosine_schedule_ends_at_its_floor() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    for floor in (0.0, 0.1):
        optimizer = torch.optim.AdamW([param], lr=1.0)
        schedule = make_schedule(optimizer, OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=floor), 10)
        lrs = []
        for _ in range(10):
            lrs.append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
        assert lrs[0] == 0.0 and lrs[2] == pytest.approx(1.0)  # linear warm-up to the peak
        assert schedule.get_last_lr()[0] == pytest.approx(floor)  # and down to the floor at the last step
        assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


def test_decoder_objective_trains_exports_and_resumes_bitwise(tmp_path: Path) -> None:
    straight = run_training(decoder_objective(tmp_path / "a"), settings(tmp_path / "a", ema_decay=0.9))
    assert straight.complete and straight.step == 4
    exported = UNet2DConditionModel.from_pretrained(tmp_path / "a" / "export" / "unet")
    saved = DDPMScheduler.from_pretrained(tmp_path / "a" / "export" / "scheduler")
    assert saved.config.prediction_type == "v_prediction"
    # what was exported (and returned) holds the EMA weights, not the last raw ones
    assert all(torch.equal(v, straight.model.state_dict()[k]) for k, v in exported.state_dict().items())
    run_training(decoder_objective(tmp_path / "b"), settings(tmp_path / "b", ema_decay=0.9), stop_after=3)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-000002", "step-000003"]
    assert not (tmp_path / "b" / "export").exists()  # nothing released before the run is complete
    resumed = run_training(decoder_objective(tmp_path / "b"), settings(tmp_path / "b", ema_decay=0.9))
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert any(not torch.equal(v, tiny_unet().state_dict()[k]) for k, v in exported.state_dict().items())


def test_resume_refuses_another_configuration(tmp_path: Path) -> None:
    run_training(decoder_objective(tmp_path), settings(tmp_path), stop_after=2)
    with pytest.raises(UserError, match="another prediction_type config"):
        run_training(decoder_objective(tmp_path, "epsilon"), settings(tmp_path))


def test_decoder_loss_goes_down_on_a_fixed_set(tmp_path: Path) -> None:
    objective = decoder_objective(tmp_path, "epsilon", cond_dropout=0.0)
    loop = replace(settings(tmp_path, steps=30), checkpoint_every=1000, log_every=1000,
                   optim=OptimConfig(lr=3e-3, warmup_steps=1))
    run = run_training(objective, loop)

    def mean_loss(model) -> float:
        state = type("S", (), {"generator": torch.Generator().manual_seed(3)})()
        batches = objective.batches(state, type("A", (), {"device": torch.device("cpu")})())
        with torch.no_grad():
            return sum(float(objective.losses(model, next(batches), state)["loss"]) for _ in range(8)) / 8

    assert mean_loss(run.model) < 0.8 * mean_loss(tiny_unet().eval())


def test_decoder_objective_refuses_mismatched_data(tmp_path: Path) -> None:
    scheduler = DDPMScheduler.from_config(K22_SCHEDULER)
    with pytest.raises(ValueError, match="one embedding per image"):
        DecoderObjective(tiny_unet, scheduler, torch.zeros(3, 4, 4, 4), torch.zeros(2, 8), torch.zeros(1, 8),
                         DecoderObjectiveConfig(), tmp_path)
