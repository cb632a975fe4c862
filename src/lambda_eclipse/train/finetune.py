"""`lambda-eclipse finetune-decoder`: Eq. 2 on the decoder UNet for many concepts at once, full or LoRA.

The paper's §3.3 / appendix D: the Kandinsky 2.2 UNet is fine-tuned on the concepts' images, conditioned on each
image's own CLIP image embedding (what the prior predicts at inference); the MoVQ and the CLIP image encoder stay
frozen. This module is configuration + data + export around the one training core: the loss and batching are
:class:`~lambda_eclipse.train.decoder.DecoderObjective` (the miniature UNet recipe trains with the same class), the
loop, checkpoints, exact resume, EMA, mixed precision and multi-GPU are :func:`~lambda_eclipse.train.core.run_training`.

Unlike the released script (FACTS §3): several concepts in one run, any batch size of (B, D) embeddings, the
latents and embeddings cached rather than recomputed every step, LoRA as well as full fine-tuning, exact resume.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path
from ..errors import UserError
from ..hub import DEFAULT_DECODER, DEFAULT_ENCODERS
from .concepts import ConceptSet, cached_encoding, find_concepts
from .checkpoint import list_checkpoints, saved_config
from .config import OptimConfig, _f, config_help, config_to_dict, load_dataclass
from .core import LoopSettings, require_same, run_training
from .decoder import DecoderObjective, DecoderObjectiveConfig

LORA_FILE = "lora.safetensors"


@dataclass(frozen=True)
class FinetuneData:
    """The concepts' images (give exactly one of concepts_dir and manifest)."""

    concepts_dir: str = _f("", "folder with one folder of images per concept (DreamBench's dataset/ layout)")
    manifest: str = _f("", "YAML/JSON file mapping concept name -> image paths (relative to the file)")
    resolution: int = _f(0, "training image side in px; 0: the decoder's native size (UNet sample_size x MoVQ scale)")
    batch_size: int = _f(4, "images per GPU per micro-batch (the released script: 1)")


@dataclass(frozen=True)
class FinetuneModel:
    """Which decoder is personalized and which frozen encoders make its inputs."""

    decoder: str = _f(DEFAULT_DECODER, "folder or Hub id with unet/, scheduler/ and movq/ (a pipeline folder works)")
    encoders: str = _f(DEFAULT_ENCODERS, "folder or Hub id with image_encoder/ and image_processor/")
    gradient_checkpointing: bool = _f(False, "recompute UNet activations in the backward pass (less memory, slower)")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA on the UNet's attention projections (mode: lora)."""

    rank: int = _f(8, "LoRA rank")
    alpha: float = _f(0.0, "LoRA alpha (scale = alpha / rank); 0: alpha = rank")
    dropout: float = _f(0.0, "dropout on the LoRA branch")
    target_modules: tuple[str, ...] = _f(("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"),
                                         "module names that get a LoRA (comma-separated on the command line)")


@dataclass(frozen=True)
class FinetuneLoss:
    """Eq. 2's loss (the target follows the decoder scheduler's prediction_type: ε for K2.2, v for the miniature)."""

    cond_dropout: float = _f(0.1, "share of conditions replaced by the zero-image embedding (keeps guidance working; "
                                  "the released script: 0)")
    snr_gamma: float = _f(0.0, "Min-SNR-γ loss weighting (0: plain MSE, as the released script's default)")


def _paper_optim() -> OptimConfig:
    return OptimConfig(lr=1e-5, weight_decay=0.0, warmup_steps=0, schedule="constant")


@dataclass(frozen=True)
class FinetuneConfig:
    """A decoder fine-tuning run."""

    data: FinetuneData = field(default_factory=FinetuneData)
    model: FinetuneModel = field(default_factory=FinetuneModel)
    mode: str = _f("full", "full (every UNet weight; exports unet/) or lora (exports lora.safetensors)")
    lora: LoraSettings = field(default_factory=LoraSettings)
    loss: FinetuneLoss = field(default_factory=FinetuneLoss)
    optim: OptimConfig = field(default_factory=_paper_optim)
    output_dir: str = _f("runs/finetune-decoder", "run folder: checkpoints/, logs/, cache/, val/ and unet/ or lora.safetensors")
    max_steps: int = _f(400, "optimizer steps (the released script: ~250-400 per concept)")
    checkpoint_every: int = _f(100, "steps between training checkpoints")
    keep_checkpoints: int = _f(2, "training checkpoints kept")
    val_every: int = _f(0, "steps between validation grids of the concepts in val/ (0 disables)")
    log_every: int = _f(10, "steps between logged losses")
    seed: int = _f(0, "seed of the batch draws, noise, timesteps and LoRA initialisation")
    mixed_precision: str = _f("auto", "no, bf16, fp16, or auto (bf16 where the device supports it, else no)")
    log_with: str = _f("tensorboard", "tensorboard, wandb, or none")
    progress: bool = _f(True, "show a progress bar")


def load_finetune_config(path: str | Path | None = None, overrides: list[str] | None = None,
                         **top: Any) -> FinetuneConfig:
    """A :class:`FinetuneConfig` from YAML + ``key.sub=value`` overrides + keyword overrides, validated."""
    config = load_dataclass(FinetuneConfig, path, overrides, "finetune-decoder", **top)
    checks = [
        (config.mode in ("full", "lora"), "mode must be full or lora"),
        (config.max_steps > 0 and config.checkpoint_every > 0 and config.keep_checkpoints > 0,
         "max_steps, checkpoint_every and keep_checkpoints must be positive"),
        (config.data.batch_size > 0, "data.batch_size must be positive"),
        (config.data.resolution >= 0, "data.resolution must be 0 (native) or a size in px"),
        (config.lora.rank > 0, "lora.rank must be positive"),
        (len(config.lora.target_modules) > 0, "lora.target_modules must name at least one module"),
        (config.optim.lr > 0 and config.optim.grad_accum_steps > 0, "optim.lr and optim.grad_accum_steps must be positive"),
        (config.optim.schedule in ("cosine", "linear", "constant"), "optim.schedule must be cosine, linear or constant"),
        (0 <= config.optim.ema_decay < 1, "optim.ema_decay must be in [0, 1)"),
        (0 <= config.loss.cond_dropout <= 1, "loss.cond_dropout must be in [0, 1]"),
        (config.mixed_precision in ("auto", "no", "bf16", "fp16"), "mixed_precision must be auto, no, bf16 or fp16"),
        (config.log_with in ("tensorboard", "wandb", "none"), "log_with must be tensorboard, wandb or none"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(f"bad config: {message}")
    return config


def finetune_config_help() -> str:
    return config_help(FinetuneConfig)


@dataclass
class FrozenParts:
    """The decoder's scheduler and MoVQ and the CLIP image encoder + processor, loaded once, never trained."""

    scheduler: Any
    movq: Any
    image_processor: Any
    image_encoder: Any
    native_size: int  # the UNet's native image side in px
    scale: int  # px per latent cell (the MoVQ's downsampling)


def load_frozen_parts(config: FinetuneConfig) -> FrozenParts:
    """Load what the run needs besides the UNet; a decoder without a UNet is refused before anything is written."""
    from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

    decoder, encoders = config.model.decoder, config.model.encoders
    for source, parts in ((decoder, ("unet", "scheduler", "movq")), (encoders, ("image_encoder", "image_processor"))):
        missing = [p for p in parts if Path(source).is_dir() and not (Path(source) / p).is_dir()]
        if missing:
            raise UserError(f"{source!r} has no {missing[0]}/ folder; model.decoder needs unet/, scheduler/, movq/ "
                            "and model.encoders image_encoder/, image_processor/")
    try:
        unet_config = UNet2DConditionModel.load_config(decoder, subfolder="unet")
        movq = VQModel.from_pretrained(decoder, subfolder="movq").eval().requires_grad_(False)
        parts = FrozenParts(
            scheduler=DDPMScheduler.from_pretrained(decoder, subfolder="scheduler"), movq=movq,
            image_processor=CLIPImageProcessorPil.from_pretrained(encoders, subfolder="image_processor"),
            image_encoder=CLIPVisionModelWithProjection.from_pretrained(encoders, subfolder="image_encoder").eval(),
            native_size=int(unet_config["sample_size"]) * 2 ** (len(movq.config.block_out_channels) - 1),
            scale=2 ** (len(movq.config.block_out_channels) - 1),
        )
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"cannot load the decoder or encoders ({str(error).strip().splitlines()[0]}); check "
                        "model.decoder and model.encoders") from None
    parts.image_encoder.requires_grad_(False)
    return parts


class FinetuneObjective(DecoderObjective):
    """Eq. 2 on the concepts' cached (latents, embeddings): builds the UNet from the decoder (with a LoRA in lora
    mode), checks that a resumed run is the same run, draws validation grids, exports ``unet/`` or the LoRA."""

    def __init__(self, config: FinetuneConfig, concepts: ConceptSet, parts: FrozenParts, latents: torch.Tensor,
                 embeds: torch.Tensor) -> None:
        from ..encoders import zero_image_embedding

        self.finetune, self.concepts, self.parts = config, concepts, parts
        self._fingerprint = concepts.fingerprint()
        self._step = 0
        super().__init__(
            make_unet=self._make_unet, scheduler=parts.scheduler, latents=latents, embeds=embeds,
            zero_embed=zero_image_embedding(parts.image_encoder).float(),
            config=DecoderObjectiveConfig(config.data.batch_size, config.loss.cond_dropout, config.loss.snr_gamma),
            export_to=config.output_dir,
        )

    def _make_unet(self) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(self.finetune.model.decoder, subfolder="unet")
        if self.finetune.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if self.finetune.mode == "lora":
            from peft import LoraConfig

            from ..adapters import ADAPTER_NAME

            lora = self.finetune.lora
            unet.requires_grad_(False)  # only the adapter trains
            unet.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, lora_dropout=lora.dropout,
                                        target_modules=list(lora.target_modules), init_lora_weights="gaussian"),
                             adapter_name=ADAPTER_NAME)
        return unet

    def config_dict(self) -> dict[str, Any]:
        return {**config_to_dict(self.finetune), "concepts": {"names": list(self.concepts.names),
                                                               "sha256": self._fingerprint},
                "prediction_type": self.scheduler.config.prediction_type}

    def check_resume(self, saved: dict[str, Any], output_dir: Path) -> None:
        check_same_run(self.finetune, self.config_dict(), saved, output_dir)

    def losses(self, model, batch, state) -> dict[str, torch.Tensor]:
        self._step = state.step + 1  # the step this micro-batch belongs to (names the validation grid)
        return super().losses(model, batch, state)

    def validate(self, model, accelerator) -> dict[str, float]:
        """Each concept's first image decoded from its own embedding (fixed seeds) -> ``val/step-N.png`` (top row:
        the training images, bottom: renders); returns the renders' mean CLIP-I to their concept's images."""
        import numpy as np
        from PIL import Image

        from ..decoding import decode_image_embeds
        from ..encoders import encode_images, load_image
        from .concepts import prepare_training_image

        first = [self.concepts.concept.index(i) for i in range(len(self.concepts.names))]
        size = int(self.latents.shape[-1]) * self.parts.scale
        embeds = self.embeds[first].to(accelerator.device)
        images = decode_image_embeds(
            model, self.scheduler, self.parts.movq.to(accelerator.device), embeds,
            self.zero_embed.expand_as(embeds), size, size, 25, 4.0,
            [torch.Generator().manual_seed(k) for k in range(len(first))], "pil")
        sources = [prepare_training_image(load_image(self.concepts.paths[i]), size) for i in first]
        normalize = torch.nn.functional.normalize
        rendered = normalize(encode_images(self.parts.image_processor, self.parts.image_encoder, images).float().cpu(), dim=-1)
        owner = torch.tensor(self.concepts.concept)
        sims = [float(rendered[c] @ normalize(self.embeds[owner == c].float(), dim=-1).mean(0)) for c in range(len(first))]
        if accelerator.is_main_process:
            grid = np.concatenate([np.concatenate([np.asarray(i) for i in row], 1) for row in (sources, images)], 0)
            with atomic_path(Path(self.finetune.output_dir) / "val" / f"step-{self._step:06d}.png") as temporary:
                Image.fromarray(grid).save(temporary, format="PNG")
        return {"concept_clip_i": sum(sims) / len(sims)}

    def export(self, model, output_dir: Path) -> None:
        """full: ``unet/`` + ``scheduler/``; lora: ``lora.safetensors``. Plus ``concepts.json`` (what it learned)."""
        if self.finetune.mode == "lora":
            from ..adapters import save_lora

            save_lora(model, Path(output_dir) / LORA_FILE)
        else:
            super().export(model, output_dir)
        with atomic_path(Path(output_dir) / "concepts.json") as temporary:
            temporary.write_text(json.dumps({"concepts": list(self.concepts.names), "images": len(self.concepts.paths),
                                             "mode": self.finetune.mode, "steps": self.finetune.max_steps}, indent=2))


def check_same_run(config: FinetuneConfig, resolved: dict[str, Any], saved: dict[str, Any], output_dir: Path) -> None:
    """Refuse to resume a checkpoint of another run: another mode, LoRA shape, concept images, decoder or size."""
    keys = ("mode", "concepts", "prediction_type") + (("lora",) if config.mode == "lora" else ())
    require_same(saved, resolved, tuple(k for k in keys if k in resolved), output_dir)
    for section, key in (("model", "decoder"), ("data", "resolution")):
        if saved.get(section, {}).get(key) != getattr(getattr(config, section), key):
            raise UserError(f"{output_dir} holds a run with another {section}.{key}; use a new output folder")


def loop_settings(config: FinetuneConfig) -> LoopSettings:
    return LoopSettings(
        output_dir=config.output_dir, max_steps=config.max_steps, optim=config.optim,
        checkpoint_every=config.checkpoint_every, keep_checkpoints=config.keep_checkpoints, val_every=config.val_every,
        log_every=config.log_every, seed=config.seed, mixed_precision=config.mixed_precision,
        log_with=config.log_with, progress=config.progress, name="finetune-decoder",
    )


def prepare_finetune(config: FinetuneConfig) -> FinetuneObjective:
    """Check every input, then encode (or read from ``output_dir/cache``) the concepts: the run's objective."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {str(out)!r} is a file; give a folder")
    concepts = find_concepts(config.data.concepts_dir or None, config.data.manifest or None)
    checkpoints = list_checkpoints(out)
    if checkpoints:  # before anything is encoded into this folder
        resolved = {**config_to_dict(config), "concepts": {"names": list(concepts.names), "sha256": concepts.fingerprint()}}
        check_same_run(config, resolved, saved_config(checkpoints[-1]), out)
    parts = load_frozen_parts(config)
    size = config.data.resolution or parts.native_size
    if size % parts.scale:
        raise UserError(f"data.resolution {size} must be a multiple of {parts.scale} px for this decoder")
    ids = f"{config.model.decoder}|{config.model.encoders}"
    latents, embeds = cached_encoding(concepts, size, ids, out / "cache",
                                      lambda: (parts.movq, parts.image_processor, parts.image_encoder))
    return FinetuneObjective(config, concepts, parts, latents, embeds)


def finetune_decoder(config: FinetuneConfig, stop_after: int | None = None) -> Path:
    """Fine-tune (or resume) the decoder on the concepts; returns the run folder, which ends holding ``unet/`` +
    ``scheduler/`` (full) or ``lora.safetensors`` (lora). ``stop_after`` ends this call early with a checkpoint."""
    return run_training(prepare_finetune(config), loop_settings(config), stop_after).output_dir
