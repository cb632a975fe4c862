"""Decoding: CLIP image embeddings -> images through the unchanged Kandinsky 2.2 decoder.

The one place that renders embeddings. :class:`~lambda_eclipse.LambdaEclipsePipeline` decodes the prior's output
with it, and everything else that has embeddings to render (the miniature world's decoder check and evaluation,
interpolation, evaluation suites) calls it too, so every image of the project is decoded the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, KandinskyV22Img2ImgPipeline, KandinskyV22Pipeline

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}


def decoder_scheduler(scheduler, name: str | None = None):
    """``scheduler`` itself (``name`` None), or a ``name`` ("ddpm", "ddim") scheduler built from its config."""
    return scheduler if name is None else SCHEDULERS[name].from_config(scheduler.config)


def decode_image_embeds(
    unet,
    scheduler,
    movq,
    image_embeds: torch.Tensor,
    negative_image_embeds: torch.Tensor,
    height: int,
    width: int,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    generator: torch.Generator | list[torch.Generator] | None = None,
    output_type: str = "pil",
    callback_on_step_end=None,
    progress_bar_config: dict[str, Any] | None = None,
    latents: torch.Tensor | None = None,
    callback_on_step_end_tensor_inputs: list[str] | None = None,
    image=None,
    strength: float = 1.0,
) -> Any:
    """Render (N, D) image embeddings, guided against (N, D) negatives (the zero-image embedding).

    Returns what diffusers' ``KandinskyV22Pipeline`` returns as ``images`` for ``output_type`` ("pil": N PIL
    images, "np": (N, H, W, 3) floats in [0, 1], "pt", or "latent"). ``generator``: one, or one per image;
    ``latents``: (N, 4, h, w) initial noise. With ``image`` (a PIL image) it is img2img instead, through
    ``KandinskyV22Img2ImgPipeline`` on the same modules: the image's MoVQ latents noised to ``strength`` of the
    schedule, and ``int(num_inference_steps · strength)`` steps run (``latents`` do not apply).
    """
    extra: dict[str, Any] = {}
    if callback_on_step_end_tensor_inputs is not None:
        extra["callback_on_step_end_tensor_inputs"] = list(callback_on_step_end_tensor_inputs)
    if image is None:
        decoder = KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq)
        extra["latents"] = latents
    else:  # the same unet/scheduler/movq objects: no second copy of the weights
        decoder = KandinskyV22Img2ImgPipeline(unet=unet, scheduler=scheduler, movq=movq)
        extra.update(image=[image] * len(image_embeds), strength=strength)
    decoder.set_progress_bar_config(**(progress_bar_config or {"disable": True}))
    return decoder(
        **extra,
        image_embeds=image_embeds.to(unet.dtype),
        negative_image_embeds=negative_image_embeds.to(unet.dtype),
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=generator,
        output_type=output_type,
        callback_on_step_end=callback_on_step_end,
    ).images
