"""The one validation of generation inputs: :func:`check_inputs`, shared by the pipeline, the CLI, the demo and the
evaluation harness. It imports torch and PIL but not diffusers or transformers, so a command refuses bad input
quickly, before any model library loads."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from PIL import Image

from .conditioning import _word_pattern, normalize_subject_word
from .controls import check_controls as _check_controls
from .errors import UserError, UserTypeError

if TYPE_CHECKING:
    from .pipeline import LambdaEclipsePipeline, SubjectInput
    from .encoders import ImageInput

# "latent": the decoder's latents, not decoded by the MoVQ; "embeds": the prior only, no decoder run at all.
OUTPUT_TYPES = ("pil", "np", "pt", "latent", "embeds")
SCHEDULER_NAMES = ("ddpm", "ddim")  # the keys of decoding.SCHEDULERS (a test keeps them equal)


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
    **controls,
) -> None:
    """The one validation of generation inputs (the arguments of :meth:`LambdaEclipsePipeline.__call__`).

    Without ``pipeline`` only the model-independent checks run, so that the CLI can refuse bad input before it
    loads a model; with ``pipeline`` also the model's: the decoder's size step, whether the prior takes subjects
    and an edge map, whether there is a decoder. Files are not opened here: a path is checked where it is read
    (:func:`~lambda_eclipse.encoders.load_image`), and a subject embedding's size where it is encoded.

    Args:
        names: how messages call an argument (the CLI passes its flags, e.g. ``{"num_inference_steps": "--steps"}``).
        controls: :meth:`LambdaEclipsePipeline.__call__`'s other keywords (``image_embeds``, ``subject_scale``,
            ``edge_strength``, ``init_image``, ``strength``, ...), checked by :func:`~.controls.check_controls`.

    Raises:
        UserError: one line naming the problem and the fix.
    """
    names = names or {}

    def name(key: str) -> str:
        return names.get(key, key)

    if subjects is not None and not isinstance(subjects, Mapping):
        raise UserTypeError(f"subjects must map a subject word to its image, e.g. {{'dog': 'dog.png'}}, got "
                            f"{type(subjects).__name__}")
    # supplied embeddings and the control knobs (subject scale, edge, img2img)
    embeds_count = _check_controls(controls, prompt, subjects, edge_image, output_type, pipeline, name)
    if embeds_count is not None:  # decoding supplied embeddings: no prompt; count the images by the embeddings
        prompt, subjects, edge_image = ["<image_embeds>"] * embeds_count, None, None

    # prompts
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, (list, tuple)):
        prompts = list(prompt)
    else:
        raise UserTypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
    if not prompts:
        raise UserError("no prompt given; pass a text prompt")
    for text in prompts:
        if not isinstance(text, str):
            raise UserTypeError(f"every prompt must be a string, got {type(text).__name__}; pass text prompts")
        if not text.strip():
            raise UserError("the prompt is empty; give a text prompt such as 'a dog on the beach'")

    # subjects and the edge map
    seen: set[str] = set()
    for word, subject in (subjects or {}).items():
        if not isinstance(word, str):
            raise UserTypeError(f"subject word {word!r} must be a string; use a word of the prompt")
        key = normalize_subject_word(word)
        if not key:
            raise UserError(f"subject word {word!r} is empty; use WORD=IMAGE with a word from the prompt")
        if key in seen:
            raise UserError(f"subject word {key!r} is given twice; give each subject word once")
        seen.add(key)
        for item in subject if isinstance(subject, (list, tuple)) and subject else [subject]:  # several pictures
            if not isinstance(item, (str, os.PathLike, Image.Image, torch.Tensor)):
                raise UserTypeError(f"subject {word!r} is a {type(item).__name__}; give an image path, a PIL image, a "
                                    ".safetensors embedding, a (D,) tensor, or a list of them")
            _check_not_empty(item, f"subject {word!r} image")
        # Checked here too (the binding checks it again on tokens) so the CLI fails before loading a model.
        for text in prompts:
            if not _word_pattern(key).search(text.lower()):
                raise UserError(f"subject word {key!r} does not occur in the prompt {text!r}; use a word of the prompt")
    if edge_image is not None and not isinstance(edge_image, (str, os.PathLike, Image.Image)):
        raise UserTypeError(f"{name('edge_image')} is a {type(edge_image).__name__}; give an image path or a PIL image")
    _check_not_empty(edge_image, name("edge_image"))

    # numbers and names
    _check_positive_int(num_images_per_prompt, name("num_images_per_prompt"))
    _check_positive_int(num_inference_steps, name("num_inference_steps"))
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) or not math.isfinite(guidance_scale):
        raise UserError(f"{name('guidance_scale')} must be a finite number, got {guidance_scale!r}")
    if guidance_scale < 0:  # diffusers would silently treat it as "no guidance"
        raise UserError(f"{name('guidance_scale')} must be 0 or more (1 or less turns guidance off), got {guidance_scale!r}")
    for key, value in (("height", height), ("width", width)):
        if value is not None:
            _check_positive_int(value, name(key), what="a positive whole number of px")
    if scheduler is not None and (not isinstance(scheduler, str) or scheduler not in SCHEDULER_NAMES):
        raise UserError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
        raise UserError(f"unknown output_type {output_type!r}; choose one of {', '.join(OUTPUT_TYPES)}")
    count = len(prompts) * num_images_per_prompt
    generators = generator if isinstance(generator, list) else [] if generator is None else [generator]
    if any(not isinstance(g, torch.Generator) for g in generators):
        raise UserTypeError("generator must be a torch.Generator or a list of them, one per image")
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
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserTypeError(f"{name} must be {what}, got {value!r}")
    if value <= 0:
        raise UserError(f"{name} must be {what}, got {value!r}")


def _check_not_empty(image, what: str) -> None:
    """A PIL image or a tensor with no pixels/values would fail deep inside the encoder; refuse it here."""
    if isinstance(image, Image.Image) and (image.width == 0 or image.height == 0):
        raise UserError(f"{what} is empty ({image.width}x{image.height} px); give a picture")
    if isinstance(image, torch.Tensor) and image.numel() == 0:
        raise UserError(f"{what} is an empty tensor; give a (D,) embedding")
