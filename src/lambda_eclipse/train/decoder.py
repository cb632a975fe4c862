"""The decoder objective: Eq. 2 on the Kandinsky-2.2-style UNet, run by the training core (:mod:`.core`).

The UNet learns to denoise MoVQ latents of an image conditioned on the CLIP image embedding of that same image
(what the prior predicts at inference). The encoders are frozen, so latents and embeddings are computed once and
passed in as tensors; each micro-batch draws rows of them with the run's generator. A share of the conditions is
replaced by the zero-image embedding, the decoder's guidance negative, so classifier-free guidance keeps working.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..atomic import atomic_dir
from ..losses import decoder_loss, diffusion_target
from .checkpoint import RunState
from .core import require_same


@dataclass(frozen=True)
class DecoderObjectiveConfig:
    """Eq. 2's batch and loss settings (optimizer and schedule: :class:`~lambda_eclipse.train.config.OptimConfig`)."""

    batch_size: int = 32
    cond_dropout: float = 0.1  # share of conditions replaced by the zero-image embedding (the CFG negative)
    snr_gamma: float = 0.0  # Min-SNR-γ loss weighting; 0 = plain MSE


class DecoderObjective:
    """Eq. 2 for :func:`~lambda_eclipse.train.core.run_training`; see :class:`~lambda_eclipse.train.core.Objective`.

    Args:
        make_unet: builds (or loads) the UNet to train; called once per run, before a checkpoint is restored.
        scheduler: the decoder's DDPM training scheduler; its ``prediction_type`` decides the target (ε or v) and
            it is saved beside the UNet.
        latents: (N, C, h, w) MoVQ latents of the training images.
        embeds: (N, D) CLIP image embeddings of the same images (the condition).
        zero_embed: (1, D) zero-image embedding.
        config: batch and loss settings.
        export_to: where ``unet/`` and ``scheduler/`` are written at the end.
        settings: the rest of the run's resolved configuration, saved in checkpoints (e.g. the UNet's shape).
    """

    def __init__(
        self, make_unet: Callable[[], torch.nn.Module], scheduler, latents: torch.Tensor, embeds: torch.Tensor,
        zero_embed: torch.Tensor, config: DecoderObjectiveConfig, export_to: str | Path,
        settings: dict[str, Any] | None = None,
    ) -> None:
        if len(latents) != len(embeds):
            raise ValueError(f"{len(latents)} latents but {len(embeds)} embeddings; give one embedding per image")
        diffusion_target(scheduler, latents[:1], latents[:1], torch.zeros(1, dtype=torch.long))  # checks the type
        self.make_unet, self.scheduler, self.config = make_unet, scheduler, config
        self.latents, self.embeds, self.zero_embed = latents, embeds, zero_embed.reshape(1, -1)
        self.export_to, self.settings = Path(export_to), settings or {}

    def config_dict(self) -> dict[str, Any]:
        return {"decoder": asdict(self.config), "unet": self.settings,
                "prediction_type": self.scheduler.config.prediction_type}

    def check_resume(self, saved: dict[str, Any], output_dir: Path) -> None:
        require_same(saved, self.config_dict(), ("unet", "prediction_type"), output_dir)

    def build_model(self) -> torch.nn.Module:
        return self.make_unet()

    def batches(self, state: RunState, accelerator):
        device = accelerator.device
        self.zero_embed = self.zero_embed.to(device)
        while True:
            rows = torch.randint(len(self.latents), (self.config.batch_size,), generator=state.generator)
            yield {"latents": self.latents[rows].to(device), "embeds": self.embeds[rows].to(device)}

    def losses(self, model, batch, state: RunState) -> dict[str, torch.Tensor]:
        latents, cond = batch["latents"], batch["embeds"]
        b, channels = len(latents), latents.shape[1]
        g = state.generator  # CPU draws, always in this order, so runs repeat on any device
        drop = (torch.rand(b, generator=g) < self.config.cond_dropout).to(cond.device)
        cond = torch.where(drop[:, None], self.zero_embed.to(cond.dtype).expand_as(cond), cond)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=g)
        noise = torch.randn(latents.shape, generator=g).to(latents)
        timesteps_d = timesteps.to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps_d)
        target = diffusion_target(self.scheduler, latents, noise, timesteps_d)
        # Kandinsky's UNet also predicts the variance (2C channels); the DDPM loss trains the first C only
        predicted = model(noisy, timesteps_d, None, added_cond_kwargs={"image_embeds": cond}).sample[:, :channels]
        return decoder_loss(predicted, target, timesteps, self.scheduler, self.config.snr_gamma)

    def validate(self, model, accelerator) -> None:
        return None

    def export(self, model, output_dir: Path) -> None:
        """``unet/`` (diffusers format) and ``scheduler/`` under ``export_to``, each folder atomically."""
        with atomic_dir(self.export_to / "unet") as temporary:
            model.save_pretrained(temporary)
        with atomic_dir(self.export_to / "scheduler") as temporary:
            self.scheduler.save_pretrained(temporary)
