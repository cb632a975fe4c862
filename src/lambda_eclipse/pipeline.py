"""LambdaEclipsePipeline: CLIP encoders + λ-ECLIPSE prior + the unchanged Kandinsky 2.2 decoder.

Prompt and subject images -> CLIP text token states with subject tokens bound to subject image embeddings
(:mod:`lambda_eclipse.conditioning`) -> one prior forward pass -> a CLIP image embedding -> diffusers'
``KandinskyV22Pipeline`` renders it, with the zero-image embedding as the guidance negative.
"""

from __future__ import annotations

import math
import numbers
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
from .conditioning import _word_pattern, interleave_prompts, normalize_subject_word
from .decoding import SCHEDULERS, decode_image_embeds, decoder_scheduler
from .encoders import ImageInput, edge_embedding, encode_images, load_image, zero_image_embedding
from .errors import UserError
from .hub import DEFAULT_DECODER, DEFAULT_ENCODERS, DEFAULT_PRIOR, PRIOR_ONLY_REPOS, TEXT_ONLY_PRIOR  # noqa: F401
from .prior import LambdaEclipsePrior

SubjectInput = Union[ImageInput, torch.Tensor]
# "latent": the decoder's latents, not decoded by the MoVQ; "embeds": the prior only, no decoder run at all.
OUTPUT_TYPES = ("pil", "np", "pt", "latent", "embeds")


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


def check_inputs(
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
    pipeline: LambdaEclipsePipeline | None = None,
    names: Mapping[str, str] | None = None,
) -> None:
    """The one validation of generation inputs (the arguments of :meth:`LambdaEclipsePipeline.__call__`).

    Without ``pipeline`` only the model-independent checks run, so that the CLI can refuse bad input before it
    loads a model; with ``pipeline`` also the model's: the decoder's size step, whether the prior takes subjects
    and an edge map, whether there is a decoder. Files are not opened here: a path is checked where it is read
    (:func:`~lambda_eclipse.encoders.load_image`), and a subject embedding's size where it is encoded.

    Args:
        names: how messages call an argument (the CLI passes its flags, e.g. ``{"num_inference_steps": "--steps"}``).

    Raises:
        UserError: one line naming the problem and the fix.
    """
    names = names or {}

    def name(key: str) -> str:
        return names.get(key, key)

    # prompts
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, (list, tuple)):
        prompts = list(prompt)
    else:
        raise UserError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
    if not prompts:
        raise UserError("no prompt given; pass a text prompt")
    for text in prompts:
        if not isinstance(text, str):
            raise UserError(f"every prompt must be a string, got {type(text).__name__}; pass text prompts")
        if not text.strip():
            raise UserError("the prompt is empty; give a text prompt such as 'a dog on the beach'")

    # subjects and the edge map
    if subjects is not None and not isinstance(subjects, Mapping):
        raise UserError(f"subjects must map a subject word to its image, e.g. {{'dog': 'dog.png'}}, got "
                        f"{type(subjects).__name__}")
    seen: set[str] = set()
    for word, subject in (subjects or {}).items():
        if not isinstance(word, str):
            raise UserError(f"subject word {word!r} must be a string; use a word of the prompt")
        key = normalize_subject_word(word)
        if not key:
            raise UserError(f"subject word {word!r} is empty; use WORD=IMAGE with a word from the prompt")
        if key in seen:
            raise UserError(f"subject word {key!r} is given twice; give each subject word once")
        seen.add(key)
        if not isinstance(subject, (str, os.PathLike, Image.Image, torch.Tensor)):
            raise UserError(f"subject {word!r} is a {type(subject).__name__}; give an image path, a PIL image, a "
                            ".safetensors embedding or a (D,) tensor")
        # Checked here too (the binding checks it again on tokens) so the CLI fails before loading a model.
        for text in prompts:
            if not _word_pattern(key).search(text.lower()):
                raise UserError(f"subject word {key!r} does not occur in the prompt {text!r}; use a word of the prompt")
    if edge_image is not None and not isinstance(edge_image, (str, os.PathLike, Image.Image)):
        raise UserError(f"{name('edge_image')} is a {type(edge_image).__name__}; give an image path or a PIL image")

    # numbers and names
    _check_positive_int(num_images_per_prompt, name("num_images_per_prompt"))
    _check_positive_int(num_inference_steps, name("num_inference_steps"))
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) or not math.isfinite(guidance_scale):
        raise UserError(f"{name('guidance_scale')} must be a finite number, got {guidance_scale!r}")
    for key, value in (("height", height), ("width", width)):
        if value is not None:
            _check_positive_int(value, name(key), what="a positive whole number of px")
    if scheduler is not None and (not isinstance(scheduler, str) or scheduler not in SCHEDULERS):
        raise UserError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if output_type not in OUTPUT_TYPES:
        raise UserError(f"unknown output_type {output_type!r}; choose one of {', '.join(OUTPUT_TYPES)}")
    count = len(prompts) * num_images_per_prompt
    generators = generator if isinstance(generator, list) else [] if generator is None else [generator]
    if any(not isinstance(g, torch.Generator) for g in generators):
        raise UserError("generator must be a torch.Generator or a list of them, one per image")
    if isinstance(generator, list) and len(generator) != count:
        raise UserError(f"{len(generator)} generators given for {count} images; give one per image or a single one")

    if pipeline is None:
        return
    # what this model can do
    if not pipeline.prior.has_control:
        if subjects:
            raise UserError("this prior is the text-only ECLIPSE prior; subjects need a λ-ECLIPSE prior")
        if edge_image is not None:
            raise UserError("this prior is the text-only ECLIPSE prior; an edge map needs a λ-ECLIPSE prior")
    if output_type == "embeds":
        return
    if pipeline.unet is None or pipeline.movq is None or pipeline.scheduler is None:
        raise UserError("this pipeline has no decoder (unet/scheduler/movq); use output_type='embeds' or load one")
    # Kandinsky 2.2 silently rounds sizes up to a multiple of scale² px; refuse instead of surprising the user.
    step = pipeline.movq_scale_factor**2
    for key, value in (("height", height), ("width", width)):
        if value is not None and value % step:
            raise UserError(f"{name(key)} must be a positive multiple of {step} px for this decoder, got {value!r}")


def _check_positive_int(value, name: str, what: str = "a positive whole number") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{name} must be {what}, got {value!r}")


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
    ) -> None:
        """Validate :meth:`__call__`'s inputs for this model: the module-level :func:`check_inputs` with ``pipeline=self``."""
        # The name resolves to the module-level function: a class body is not an enclosing scope of its methods.
        check_inputs(prompt, subjects, edge_image, num_images_per_prompt, num_inference_steps, guidance_scale, height,
                     width, scheduler, generator, output_type, pipeline=self, names=names)

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
        self.check_inputs(prompt, subjects, edge_image, num_images_per_prompt, generator=generator, output_type="embeds")
        return self._prior_embeddings(prompt, subjects, edge_image, num_images_per_prompt, generator)

    def _prior_embeddings(self, prompt, subjects, edge_image, num_images_per_prompt, generator) -> LambdaEclipsePriorOutput:
        """:meth:`prior_embeddings` on inputs that :meth:`check_inputs` has passed."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        count = len(prompts) * num_images_per_prompt
        embeds = {word: self.encode_subject(image, word) for word, image in (subjects or {}).items()}
        condition = interleave_prompts(self.tokenizer, self.text_encoder, prompts, embeds)
        negative = zero_image_embedding(self.image_encoder).to(self.prior.dtype)
        control = None
        if self.prior.has_control:
            control = negative
            if edge_image is not None:
                edge = load_image(edge_image, what="edge image")
                control = edge_embedding(self.image_processor, self.image_encoder, edge).to(self.prior.dtype)

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
            output_type: "pil", "np", "pt", "latent" (decoder latents), or "embeds" (prior only, no decoding).

        Raises:
            UserError: bad inputs (see :func:`check_inputs`), unreadable subject or edge files, a subject word
                the prompt's tokens do not hold, or a prompt longer than the text encoder takes.
        """
        self.check_inputs(prompt, subjects, edge_image, num_images_per_prompt, num_inference_steps, guidance_scale,
                          height, width, scheduler, generator, output_type)
        prior = self._prior_embeddings(prompt, subjects, edge_image, num_images_per_prompt, generator)
        if output_type == "embeds":
            return LambdaEclipsePipelineOutput(None, prior.image_embeds, prior.negative_image_embeds)
        between_stages = getattr(self, "_between_stages", None)
        if between_stages is not None:  # a memory mode frees the encoders and prior, loads the decoder (memory.py)
            between_stages(self)
        height, width = self._default_size(height, width)
        decoded = decode_image_embeds(
            self.unet, decoder_scheduler(self.scheduler, scheduler), self.movq, prior.image_embeds,
            prior.negative_image_embeds, height, width, num_inference_steps, guidance_scale, generator, output_type,
            callback_on_step_end, getattr(self, "_progress_bar_config", {}),
        )
        self.maybe_free_model_hooks()
        if not return_dict:
            return (decoded, prior.image_embeds, prior.negative_image_embeds)
        return LambdaEclipsePipelineOutput(decoded, prior.image_embeds, prior.negative_image_embeds)

    def _default_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """Missing sizes -> the UNet's native size (sample_size latents × the MoVQ's scale)."""
        native = int(self.unet.config.sample_size) * self.movq_scale_factor
        return height or native, width or native
