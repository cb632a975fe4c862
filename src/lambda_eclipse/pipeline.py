"""LambdaEclipsePipeline: CLIP encoders + λ-ECLIPSE prior + the unchanged Kandinsky 2.2 decoder.

Prompt and subject images -> CLIP text token states with subject tokens bound to subject image embeddings
(:mod:`lambda_eclipse.conditioning`) -> one prior forward pass -> a CLIP image embedding -> diffusers'
``KandinskyV22Pipeline`` renders it, with the zero-image embedding as the guidance negative.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, KandinskyV22Pipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .conditioning import interleave_prompts, normalize_subject_word
from .encoders import ImageInput, edge_embedding, encode_images, load_image, zero_image_embedding
from .errors import UserError
from .prior import LambdaEclipsePrior

DEFAULT_PRIOR = "ECLIPSE-Community/Lambda-ECLIPSE-Prior-v1.0"
TEXT_ONLY_PRIOR = "ECLIPSE-Community/ECLIPSE_KandinskyV22_Prior"
DEFAULT_ENCODERS = "kandinsky-community/kandinsky-2-2-prior"
DEFAULT_DECODER = "kandinsky-community/kandinsky-2-2-decoder"
PRIOR_ONLY_REPOS = (DEFAULT_PRIOR, TEXT_ONLY_PRIOR)

SubjectInput = Union[ImageInput, torch.Tensor]
SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}


@dataclass
class LambdaEclipsePriorOutput(BaseOutput):
    """Prior-only output, for decoding elsewhere.

    Attributes:
        image_embeds: (N, D) predicted CLIP image embeddings, N = prompts × num_images_per_prompt.
        negative_image_embeds: (N, D) zero-image embeddings (the decoder's guidance negative).
    """

    image_embeds: torch.Tensor
    negative_image_embeds: torch.Tensor


@dataclass
class LambdaEclipsePipelineOutput(BaseOutput):
    """Images and the embeddings they were decoded from (N = prompts × num_images_per_prompt)."""

    images: list[Image.Image] | torch.Tensor
    image_embeds: torch.Tensor
    negative_image_embeds: torch.Tensor


def load_subject_embedding(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, str]]:
    """Read a subject embedding saved by :meth:`LambdaEclipsePipeline.save_subject_embedding` -> ((D,), metadata)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor("image_embeds"), dict(handle.metadata() or {})
    except (SafetensorError, OSError, KeyError) as error:
        raise UserError(f"subject embedding {str(path)!r} cannot be read ({error}); re-create it with encode-subject") from None


class LambdaEclipsePipeline(DiffusionPipeline):
    """Zero-shot single- and multi-subject personalized generation (λ-ECLIPSE on Kandinsky 2.2).

    Components: ``prior`` (:class:`LambdaEclipsePrior`), ``text_encoder`` (CLIPTextModelWithProjection),
    ``tokenizer`` (CLIPTokenizer), ``image_encoder`` (CLIPVisionModelWithProjection), ``image_processor``
    (CLIP image processor), and the decoder: ``unet`` (UNet2DConditionModel), ``scheduler`` (DDPM/DDIM) and
    ``movq`` (VQModel). The decoder components are optional for prior-only use.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->prior->unet->movq"
    _optional_components = ["unet", "scheduler", "movq"]

    def __init__(
        self,
        prior: LambdaEclipsePrior,
        text_encoder,
        tokenizer,
        image_encoder,
        image_processor,
        unet=None,
        scheduler=None,
        movq=None,
    ) -> None:
        super().__init__()
        self.register_modules(
            prior=prior,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            image_encoder=image_encoder,
            image_processor=image_processor,
            unet=unet,
            scheduler=scheduler,
            movq=movq,
        )

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike = DEFAULT_PRIOR, **kwargs):
        """Load a saved pipeline folder, or compose the Hub defaults around a prior-only repo or folder.

        A folder with ``model_index.json`` (written by :meth:`save_pretrained`) loads as usual. A prior alone (the
        released λ-ECLIPSE or ECLIPSE repo ids, or a local folder holding just ``config.json`` and weights) is
        composed with the encoders of ``encoders_repo`` (default kandinsky-2-2-prior) and the decoder of
        ``decoder_repo`` (default kandinsky-2-2-decoder).
        """
        path = Path(pretrained_model_name_or_path)
        local = path.is_dir()
        if local and (path / "model_index.json").is_file():
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if (local and (path / "config.json").is_file()) or str(pretrained_model_name_or_path) in PRIOR_ONLY_REPOS:
            return cls.from_components(prior=str(pretrained_model_name_or_path), **kwargs)
        if local or Path(os.path.expanduser(str(pretrained_model_name_or_path))).exists():
            raise UserError(
                f"{str(pretrained_model_name_or_path)!r} is not a λ-ECLIPSE model folder (no model_index.json or "
                "config.json); give a folder written by save_pretrained or a Hub id"
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_components(
        cls,
        prior: str = DEFAULT_PRIOR,
        encoders_repo: str = DEFAULT_ENCODERS,
        decoder_repo: str | None = DEFAULT_DECODER,
        torch_dtype: torch.dtype | None = None,
        **hub_kwargs,
    ) -> "LambdaEclipsePipeline":
        """Compose a pipeline from a prior, CLIP encoders (repo with encoder subfolders) and a K2.2 decoder repo."""
        from diffusers import UNet2DConditionModel, VQModel
        from transformers import (
            CLIPImageProcessorPil,
            CLIPTextModelWithProjection,
            CLIPTokenizer,
            CLIPVisionModelWithProjection,
        )

        dtype = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        dtype_tf = {"dtype": torch_dtype} if torch_dtype is not None else {}
        parts = dict(
            prior=LambdaEclipsePrior.from_pretrained(prior, **dtype, **hub_kwargs),
            text_encoder=CLIPTextModelWithProjection.from_pretrained(encoders_repo, subfolder="text_encoder", **dtype_tf, **hub_kwargs),
            tokenizer=CLIPTokenizer.from_pretrained(encoders_repo, subfolder="tokenizer", **hub_kwargs),
            image_encoder=CLIPVisionModelWithProjection.from_pretrained(encoders_repo, subfolder="image_encoder", **dtype_tf, **hub_kwargs),
            # The PIL backend is chosen deliberately: it needs no torchvision and gives the same preprocessing.
            image_processor=CLIPImageProcessorPil.from_pretrained(encoders_repo, subfolder="image_processor", **hub_kwargs),
        )
        if decoder_repo is not None:
            parts.update(
                unet=UNet2DConditionModel.from_pretrained(decoder_repo, subfolder="unet", **dtype, **hub_kwargs),
                scheduler=DDPMScheduler.from_pretrained(decoder_repo, subfolder="scheduler", **hub_kwargs),
                movq=VQModel.from_pretrained(decoder_repo, subfolder="movq", **dtype, **hub_kwargs),
            )
        return cls(**parts)

    # ----------------------------------------------------------------------------------------------- encoding
    @property
    def embedding_dim(self) -> int:
        return int(self.prior.config.embedding_dim)

    def encode_subject(self, subject: SubjectInput, word: str = "subject") -> torch.Tensor:
        """A subject image (path, PIL image), a saved ``.safetensors`` embedding, or a (D,) tensor -> (D,) embedding."""
        if isinstance(subject, torch.Tensor):
            embedding = subject.reshape(-1) if subject.dim() == 2 and subject.shape[0] == 1 else subject
        elif not isinstance(subject, Image.Image) and str(subject).endswith(".safetensors"):
            if not Path(subject).is_file():
                raise UserError(f"subject embedding file {str(subject)!r} does not exist; check the path")
            embedding, _ = load_subject_embedding(subject)
        else:
            image = load_image(subject, what=f"subject {word!r} image")
            embedding = encode_images(self.image_processor, self.image_encoder, [image])[0]
        if embedding.dim() != 1 or embedding.shape[0] != self.embedding_dim:
            raise UserError(
                f"subject {word!r} embedding has shape {tuple(embedding.shape)}, but this model uses "
                f"({self.embedding_dim},); encode the subject with this model's image encoder"
            )
        return embedding.to(self._execution_device, self.prior.dtype)

    def save_subject_embedding(self, word: str, subject: ImageInput, path: str | os.PathLike) -> torch.Tensor:
        """Encode a subject image once and save it (safetensors, atomically) for reuse in place of the image."""
        from safetensors.torch import save_file

        embedding = self.encode_subject(subject, word).float().cpu().contiguous()
        encoder_id = str(getattr(self.image_encoder.config, "_name_or_path", "") or self.name_or_path or "")
        metadata = {"word": normalize_subject_word(word), "encoder": encoder_id, "dim": str(embedding.shape[0])}
        path = Path(path)
        temporary = path.with_name(path.name + ".tmp")
        save_file({"image_embeds": embedding}, str(temporary), metadata=metadata)
        os.replace(temporary, path)
        return embedding

    # ----------------------------------------------------------------------------------------------- prior
    @torch.no_grad()
    def prior_embeddings(
        self,
        prompt: str | list[str],
        subjects: dict[str, SubjectInput] | None = None,
        edge_image: ImageInput | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> LambdaEclipsePriorOutput:
        """Run the prior only: (N, D) image embeddings and their (N, D) zero-image negatives."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise UserError("no prompt given; pass a text prompt")
        _check_positive_int(num_images_per_prompt, "num_images_per_prompt")
        count = len(prompts) * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != count:
            raise UserError(f"{len(generator)} generators given for {count} images; give one per image or a single one")
        subjects = subjects or {}
        if subjects and not self.prior.has_control:
            raise UserError("this prior is the text-only ECLIPSE prior; subjects need a λ-ECLIPSE prior")
        embeds = {word: self.encode_subject(image, word) for word, image in subjects.items()}
        condition = interleave_prompts(self.tokenizer, self.text_encoder, prompts, embeds)
        negative = zero_image_embedding(self.image_encoder).to(self.prior.dtype)
        control = None
        if self.prior.has_control:
            control = negative
            if edge_image is not None:
                edge = load_image(edge_image, what="edge image")
                control = edge_embedding(self.image_processor, self.image_encoder, edge).to(self.prior.dtype)
        elif edge_image is not None:
            raise UserError("this prior is the text-only ECLIPSE prior; an edge map needs a λ-ECLIPSE prior")

        def repeat(x: torch.Tensor) -> torch.Tensor:
            return x.repeat_interleave(num_images_per_prompt, dim=0)

        device, dtype = self._execution_device, self.prior.dtype
        noise = randn_tensor((count, self.embedding_dim), generator=generator, device=device, dtype=dtype)
        predicted = self.prior(
            hidden_states=noise,
            proj_embedding=repeat(condition.pooled_text),
            encoder_hidden_states=repeat(condition.token_states),
            attention_mask=repeat(condition.attention_mask),
            control_embedding=None if control is None else control.expand(count, -1),
        ).predicted_image_embedding
        return LambdaEclipsePriorOutput(image_embeds=predicted, negative_image_embeds=negative.expand(count, -1))

    # ----------------------------------------------------------------------------------------------- full call
    @property
    def movq_scale_factor(self) -> int:
        return 2 ** (len(self.movq.config.block_out_channels) - 1)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        subjects: dict[str, SubjectInput] | None = None,
        edge_image: ImageInput | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        scheduler: str | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
    ) -> LambdaEclipsePipelineOutput | tuple:
        """Generate personalized images.

        Args:
            prompt: a prompt or a list of prompts; every subject word must occur in each of them.
            subjects: subject word -> image (path or PIL), saved ``.safetensors`` embedding, or (D,) tensor.
            edge_image: optional picture whose Canny edges condition the prior (λ priors only).
            num_images_per_prompt: images per prompt.
            num_inference_steps: decoder denoising steps (paper: 50).
            guidance_scale: decoder classifier-free guidance against the zero-image embedding (paper: 7.5).
            height, width: output size, a multiple of the decoder's size step (64 px for Kandinsky 2.2);
                default: the UNet's native size.
            scheduler: "ddpm" (what Kandinsky 2.2 ships) or "ddim" (what the paper states); None keeps the loaded one.
            generator: one generator, or one per image (prompts × num_images_per_prompt) for per-image seeds.
            output_type: "pil", "np", "pt", or "embeds" (prior only, no decoding).
        """
        prior = self.prior_embeddings(prompt, subjects, edge_image, num_images_per_prompt, generator)
        if output_type == "embeds":
            return LambdaEclipsePipelineOutput(None, prior.image_embeds, prior.negative_image_embeds)
        if self.unet is None or self.movq is None or self.scheduler is None:
            raise UserError("this pipeline has no decoder (unet/scheduler/movq); use output_type='embeds' or load one")
        _check_positive_int(num_inference_steps, "num_inference_steps")
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
            raise UserError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        height, width = self._check_size(height, width)
        decoder = KandinskyV22Pipeline(unet=self.unet, scheduler=self._scheduler(scheduler), movq=self.movq)
        decoder.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        decoded = decoder(
            image_embeds=prior.image_embeds.to(self.unet.dtype),
            negative_image_embeds=prior.negative_image_embeds.to(self.unet.dtype),
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type=output_type,
            callback_on_step_end=callback_on_step_end,
        ).images
        self.maybe_free_model_hooks()
        if not return_dict:
            return (decoded, prior.image_embeds, prior.negative_image_embeds)
        return LambdaEclipsePipelineOutput(decoded, prior.image_embeds, prior.negative_image_embeds)

    def _scheduler(self, name: str | None):
        if name is None:
            return self.scheduler
        if name not in SCHEDULERS:
            raise UserError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
        return SCHEDULERS[name].from_config(self.scheduler.config)

    def _check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        # Kandinsky 2.2 silently rounds sizes up to a multiple of scale² px; refuse instead of surprising the user.
        step = self.movq_scale_factor**2
        native = int(self.unet.config.sample_size) * self.movq_scale_factor
        sizes = []
        for name, value in (("height", height), ("width", width)):
            value = native if value is None else value
            if not isinstance(value, int) or value <= 0 or value % step:
                raise UserError(f"{name} must be a positive multiple of {step} px for this decoder, got {value!r}")
            sizes.append(value)
        return sizes[0], sizes[1]


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{name} must be a positive whole number, got {value!r}")
