"""LambdaEclipsePipeline: CLIP encoders + λ-ECLIPSE prior + the unchanged Kandinsky 2.2 decoder.

Prompt and subject images -> CLIP text token states with subject tokens bound to subject image embeddings
(:mod:`lambda_eclipse.conditioning`) -> one prior forward pass -> a CLIP image embedding -> diffusers'
``KandinskyV22Pipeline`` renders it, with the zero-image embedding as the guidance negative.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .atomic import atomic_path
from .checks import check_weights_finite, require_finite
from .conditioning import interleave_prompts, normalize_subject_word
from .decoding import decode_image_embeds, decoder_scheduler
from .encoders import ImageInput, edge_embedding, encode_images, load_image, prepare_subject_image, zero_image_embedding
from .errors import UserError
from .inputs import OUTPUT_TYPES, check_inputs  # noqa: F401  (re-exported; the method below calls the function)
from .interpolation import geodesic_combine, layered_scales, normalized_mean, slerp
from .hub import DEFAULT_DECODER, DEFAULT_ENCODERS, DEFAULT_PRIOR, PRIOR_ONLY_REPOS, TEXT_ONLY_PRIOR  # noqa: F401
from .prior import LambdaEclipsePrior

SubjectInput = Union[ImageInput, torch.Tensor]


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


def _check_components(folder: Path) -> None:
    """Name the component a saved pipeline folder lacks (diffusers would only say "no file named config.json")."""
    import json

    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{str(folder)!r}: model_index.json cannot be read ({error}); re-save the model") from None
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        part = folder / name
        if not part.is_dir() or not any(part.iterdir()):
            raise UserError(f"model folder {str(folder)!r} lacks its {name!r} component ({name}/ is missing or "
                            "empty); copy the whole folder or re-save it with save_pretrained")


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
        for key in ("trust_remote_code", "custom_pipeline", "custom_revision"):
            if kwargs.pop(key, None):  # a model folder is data: never run code that ships with it
                raise UserError(f"{key} is not supported: λ-ECLIPSE loads weights and configs only, never model code")
        path = Path(pretrained_model_name_or_path)
        local = path.is_dir()
        if local and (path / "model_index.json").is_file():
            _check_components(path)
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        elif (local and (path / "config.json").is_file()) or str(pretrained_model_name_or_path) in PRIOR_ONLY_REPOS:
            pipe = cls.from_components(prior=str(pretrained_model_name_or_path), **kwargs)
        elif local or Path(os.path.expanduser(str(pretrained_model_name_or_path))).exists():
            raise UserError(
                f"{str(pretrained_model_name_or_path)!r} is not a λ-ECLIPSE model folder (no model_index.json or "
                "config.json); give a folder written by save_pretrained or a Hub id"
            )
        else:
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        for name, component in pipe.components.items():  # once at load: damaged bytes would make black images
            if isinstance(component, torch.nn.Module):
                check_weights_finite(component, f"the {name} of {str(pretrained_model_name_or_path)!r}")
        return pipe

    @classmethod
    def from_components(
        cls,
        prior: str = DEFAULT_PRIOR,
        encoders_repo: str = DEFAULT_ENCODERS,
        decoder_repo: str | None = DEFAULT_DECODER,
        torch_dtype: torch.dtype | None = None,
        unet=None,
        **hub_kwargs,
    ) -> "LambdaEclipsePipeline":
        """Compose a pipeline from a prior, CLIP encoders (repo with encoder subfolders) and a K2.2 decoder repo;
        ``unet`` (a loaded UNet, e.g. a fine-tuned one) replaces the decoder repo's."""
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
                unet=unet if unet is not None else UNet2DConditionModel.from_pretrained(decoder_repo, subfolder="unet", **dtype, **hub_kwargs),
                scheduler=DDPMScheduler.from_pretrained(decoder_repo, subfolder="scheduler", **hub_kwargs),
                movq=VQModel.from_pretrained(decoder_repo, subfolder="movq", **dtype, **hub_kwargs),
            )
        return cls(**parts)

    # ----------------------------------------------------------------------------------------------- personalized decoder
    def load_lora(self, path: str | os.PathLike, scale: float = 1.0) -> None:
        """Add a decoder LoRA written by ``finetune-decoder`` (its ``lora.safetensors``) at strength ``scale``
        (diffusers' PEFT integration on the UNet; needs peft). A LoRA of another UNet shape is a UserError."""
        from .adapters import apply_decoder_adapters

        apply_decoder_adapters(self, lora=path, lora_scale=scale)

    def unload_lora(self) -> None:
        """Remove the decoder LoRA: the UNet computes exactly what it did before :meth:`load_lora`."""
        from .adapters import unload_lora

        if self.unet is not None:
            unload_lora(self.unet)

    # ----------------------------------------------------------------------------------------------- encoding
    @property
    def embedding_dim(self) -> int:
        return int(self.prior.config.embedding_dim)

    def encode_subject(self, subject: SubjectInput, word: str = "subject") -> torch.Tensor:
        """A subject image (path, PIL image), a saved ``.safetensors`` embedding, or a (D,) tensor -> (D,) embedding.

        A list of them (several pictures of one subject) -> their normalized mean (:func:`~.interpolation.normalized_mean`).
        """
        if isinstance(subject, (list, tuple)):
            return normalized_mean(torch.stack([self.encode_subject(item, word) for item in subject]))
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
        require_finite(embedding, f"subject {word!r} embedding", "re-create it with encode-subject")
        return embedding.to(self._execution_device, self.prior.dtype)

    def save_subject_embedding(self, word: str, subject: ImageInput, path: str | os.PathLike) -> torch.Tensor:
        """Encode a subject image once and save it (safetensors, atomically) for reuse in place of the image."""
        from safetensors.torch import save_file

        embedding = self.encode_subject(subject, word).float().cpu().contiguous()
        encoder_id = str(getattr(self.image_encoder.config, "_name_or_path", "") or self.name_or_path or "")
        metadata = {"word": normalize_subject_word(word), "encoder": encoder_id, "dim": str(embedding.shape[0])}
        with atomic_path(path) as temporary:
            save_file({"image_embeds": embedding}, str(temporary), metadata=metadata)
        return embedding

    def check_inputs(
        self,
        prompt: str | list[str],
        subjects: Mapping[str, SubjectInput] | None = None,
        edge_image: ImageInput | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        scheduler: str | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        names: Mapping[str, str] | None = None,
        **controls,
    ) -> None:
        """Validate :meth:`__call__`'s inputs for this model: the module-level :func:`check_inputs` with ``pipeline=self``."""
        # The name resolves to the module-level function: a class body is not an enclosing scope of its methods.
        check_inputs(prompt, subjects, edge_image, num_images_per_prompt, num_inference_steps, guidance_scale, height,
                     width, scheduler, generator, output_type, pipeline=self, names=names, **controls)

    # ----------------------------------------------------------------------------------------------- prior
    @torch.no_grad()
    def prior_embeddings(
        self,
        prompt: str | list[str],
        subjects: dict[str, SubjectInput] | None = None,
        edge_image: ImageInput | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        **controls,
    ) -> LambdaEclipsePriorOutput:
        """Run the prior only: (N, D) image embeddings and their (N, D) zero-image negatives.

        ``controls``: ``subject_scale``, ``edge_is_map``, ``canny_low``, ``canny_high``, ``edge_strength`` as in
        :meth:`__call__`."""
        self.check_inputs(prompt, subjects, edge_image, num_images_per_prompt, generator=generator,
                          output_type="embeds", **controls)
        return self._prior_embeddings(prompt, subjects, edge_image, num_images_per_prompt, generator, **controls)

    def _prior_embeddings(self, prompt, subjects, edge_image, num_images_per_prompt, generator, subject_scale=1.0,
                          edge_is_map=False, canny_low=100, canny_high=200, edge_strength=1.0) -> LambdaEclipsePriorOutput:
        """:meth:`prior_embeddings` on inputs that :meth:`check_inputs` has passed.

        A subject scale other than 1 runs the prior once per nested set of bound subjects (same noise) and moves from
        the text-only prediction towards them on the sphere (:func:`~.interpolation.layered_scales`)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        count = len(prompts) * num_images_per_prompt
        embeds = {word: self.encode_subject(image, word) for word, image in (subjects or {}).items()}
        negative = zero_image_embedding(self.image_encoder).to(self.prior.dtype)
        control = None
        if self.prior.has_control:
            control = negative
            if edge_image is not None:
                edge = load_image(edge_image, what="edge image")
                control = edge_embedding(self.image_processor, self.image_encoder, edge, canny_low, canny_high,
                                         edge_is_map).to(self.prior.dtype)
                if edge_strength != 1:  # 0: no edge (the zero-image embedding); 1: the edge map's embedding
                    control = slerp(negative, control, edge_strength)

        def repeat(x: torch.Tensor) -> torch.Tensor:
            return x.repeat_interleave(num_images_per_prompt, dim=0)

        device, dtype = self._execution_device, self.prior.dtype
        noise = randn_tensor((count, self.embedding_dim), generator=generator, device=device, dtype=dtype)

        def predict(bound: dict[str, torch.Tensor]) -> torch.Tensor:
            condition = interleave_prompts(self.tokenizer, self.text_encoder, prompts, bound)
            return self.prior(
                hidden_states=noise,
                proj_embedding=repeat(condition.pooled_text),
                encoder_hidden_states=repeat(condition.token_states),
                attention_mask=repeat(condition.attention_mask),
                control_embedding=None if control is None else control.expand(count, -1),
            ).predicted_image_embedding

        words = list(embeds)
        per_word = subject_scale if isinstance(subject_scale, Mapping) else {}
        per_word = {normalize_subject_word(w): float(s) for w, s in per_word.items()}
        default = 1.0 if isinstance(subject_scale, Mapping) else float(subject_scale)
        scales = [per_word.get(normalize_subject_word(w), default) for w in words]
        if all(s == 1.0 for s in scales):  # the paper's behaviour: one pass with every subject bound
            predicted = predict(embeds)
        else:
            order, weights = layered_scales(scales)
            layers = [(j, w) for j, w in enumerate(weights) if w != 0]
            predicted = predict({})  # text only
            if layers:
                targets = [predict({words[i]: embeds[words[i]] for i in order[: j + 1]}) for j, _ in layers]
                predicted = geodesic_combine(predicted, targets, [w for _, w in layers])
        return LambdaEclipsePriorOutput(image_embeds=predicted, negative_image_embeds=negative.expand(count, -1))

    def _supplied_embeddings(self, image_embeds, negative_image_embeds, num_images_per_prompt) -> LambdaEclipsePriorOutput:
        """User-supplied (N, D) or (D,) embeddings (and negatives; default the zero-image embedding), repeated per image."""
        device, dtype = self._execution_device, self.prior.dtype
        embeds = image_embeds.reshape(-1, image_embeds.shape[-1]).to(device, dtype)
        embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
        if negative_image_embeds is None:
            negative = zero_image_embedding(self.image_encoder).to(dtype).expand(len(embeds), -1)
        else:
            negative = negative_image_embeds.reshape(-1, embeds.shape[-1]).to(device, dtype)
            negative = negative.expand(len(embeds), -1) if len(negative) == 1 else negative.repeat_interleave(
                num_images_per_prompt, dim=0)
        return LambdaEclipsePriorOutput(image_embeds=embeds, negative_image_embeds=negative)

    # ----------------------------------------------------------------------------------------------- full call
    @property
    def movq_scale_factor(self) -> int:
        return 2 ** (len(self.movq.config.block_out_channels) - 1)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        subjects: dict[str, SubjectInput | list[SubjectInput]] | None = None,
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
        *,
        image_embeds: torch.Tensor | None = None,
        negative_image_embeds: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        subject_scale: float | Mapping[str, float] = 1.0,
        edge_is_map: bool = False,
        canny_low: float = 100,
        canny_high: float = 200,
        edge_strength: float = 1.0,
        init_image: ImageInput | None = None,
        strength: float = 0.75,
    ) -> LambdaEclipsePipelineOutput | tuple:
        """Generate personalized images.

        Args:
            prompt: a prompt or a list of prompts; every subject word must occur in each of them.
            subjects: subject word -> image (path or PIL), saved ``.safetensors`` embedding, (D,) tensor, or a list
                of them (several pictures of one subject: their normalized mean).
            edge_image: optional picture whose Canny edges condition the prior (λ priors only).
            num_images_per_prompt: images per prompt (per supplied embedding with ``image_embeds``).
            num_inference_steps: decoder denoising steps (paper: 50).
            guidance_scale: decoder classifier-free guidance against the zero-image embedding (paper: 7.5).
            height, width: output size, a multiple of the decoder's size step (64 px for Kandinsky 2.2);
                default: the UNet's native size.
            scheduler: "ddpm" (what Kandinsky 2.2 ships) or "ddim" (what the paper states); None keeps the loaded one.
            generator: one generator, or one per image (prompts × num_images_per_prompt) for per-image seeds.
            output_type: "pil", "np", "pt", "latent" (decoder latents), or "embeds" (prior only, no decoding).
            callback_on_step_end, callback_on_step_end_tensor_inputs: as in diffusers, called after each decoder step.
            image_embeds, negative_image_embeds: (N, D) or (D,) embeddings to decode instead of running the prior
                (no prompt then); the negative defaults to the zero-image embedding.
            latents: (N, C, h, w) initial decoder noise, as in diffusers.
            subject_scale: how strongly the subjects pull the image, 0 (text only) .. 1 (the paper) .. 2, one for all
                or ``{word: scale}`` (others 1): a move on the sphere from the text-only prediction towards the
                subject-bound ones.
            edge_is_map, canny_low, canny_high: ``edge_image`` is an edge map used as is, or a photo Canny'd with these
                thresholds; edge_strength: 0 (no edge) .. 1 (the edge map's embedding) .. 2, on the sphere.
            init_image, strength: img2img through diffusers' ``KandinskyV22Img2ImgPipeline`` on the same components;
                strength in (0, 1] is the share of the denoising steps that run.

        Raises:
            UserError: bad inputs (see :func:`check_inputs`), unreadable subject or edge files, a subject word
                the prompt's tokens do not hold, or a prompt longer than the text encoder takes.
        """
        controls = dict(subject_scale=subject_scale, edge_is_map=edge_is_map, canny_low=canny_low,
                        canny_high=canny_high, edge_strength=edge_strength)
        self.check_inputs(prompt, subjects, edge_image, num_images_per_prompt, num_inference_steps, guidance_scale,
                          height, width, scheduler, generator, output_type, image_embeds=image_embeds,
                          negative_image_embeds=negative_image_embeds, latents=latents, init_image=init_image,
                          strength=strength, callback_on_step_end=callback_on_step_end,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, **controls)
        if image_embeds is not None:
            prior = self._supplied_embeddings(image_embeds, negative_image_embeds, num_images_per_prompt)
        else:
            prior = self._prior_embeddings(prompt, subjects, edge_image, num_images_per_prompt, generator, **controls)
        if output_type == "embeds":
            return LambdaEclipsePipelineOutput(None, prior.image_embeds, prior.negative_image_embeds)
        between_stages = getattr(self, "_between_stages", None)
        if between_stages is not None:  # a memory mode frees the encoders and prior, loads the decoder (memory.py)
            between_stages(self)
        height, width = self._default_size(height, width)
        init = None if init_image is None else prepare_subject_image(load_image(init_image, what="init image"))
        decoded = decode_image_embeds(
            self.unet, decoder_scheduler(self.scheduler, scheduler), self.movq, prior.image_embeds,
            prior.negative_image_embeds, height, width, num_inference_steps, guidance_scale, generator, output_type,
            callback_on_step_end, getattr(self, "_progress_bar_config", {}), latents=latents,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, image=init, strength=strength,
        )
        self.maybe_free_model_hooks()
        if not return_dict:
            return (decoded, prior.image_embeds, prior.negative_image_embeds)
        return LambdaEclipsePipelineOutput(decoded, prior.image_embeds, prior.negative_image_embeds)

    def interpolate(self, corners, steps: int = 5, path: str = "slerp", seed: int = 0, **kwargs):
        """Frames between 2 corners (a line of ``steps``) or 4 (a ``steps × steps`` grid, the paper's Figure 7).

        Each corner is a prompt, a :class:`~lambda_eclipse.interpolation.Corner` (prompt, its own subjects, edge
        map) or a (D,) embedding; ``path`` "slerp" (default) or "lerp" (the paper's). ``kwargs``: the decoder
        settings and controls of :meth:`__call__`, ``positions``, ``batch_size``, and ``spacing`` ("uniform", or
        "perceptual": frames at even CLIP-I steps) with its ``probes``; see
        :func:`~lambda_eclipse.interpolation.run_interpolation`. Returns an ``InterpolationOutput``.
        """
        from .interpolation import run_interpolation

        return run_interpolation(self, corners, steps, path, seed, **kwargs)

    def _default_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """Missing sizes -> the UNet's native size (sample_size latents × the MoVQ's scale)."""
        native = int(self.unet.config.sample_size) * self.movq_scale_factor
        return height or native, width or native
