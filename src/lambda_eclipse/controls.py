"""The checks of the generation controls beyond prompt and subjects, part of the pipeline's ``check_inputs``.

Supplied image embeddings, initial latents, step-end callbacks, the subject scale, the edge knobs and img2img's
init image and strength: each wrong value is one :class:`~lambda_eclipse.errors.UserError` line naming it and
the fix. :func:`lambda_eclipse.inputs.check_inputs` calls :func:`check_controls`; nothing else should.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping

import torch
from PIL import Image

from .conditioning import normalize_subject_word
from .errors import UserError, UserTypeError

# The keywords of __call__ beyond the prompt-and-subjects ones, with their defaults (checked by _check_controls).
CONTROLS = dict(image_embeds=None, negative_image_embeds=None, latents=None, callback_on_step_end=None,
                callback_on_step_end_tensor_inputs=None, subject_scale=1.0, edge_is_map=False, canny_low=100,
                canny_high=200, edge_strength=1.0, init_image=None, strength=0.75)


def _real(value, name: str, low: float, high: float, low_open: bool = False) -> None:
    """A finite real number in [low, high] ((low, high] with ``low_open``) or a one-line UserError."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        raise UserError(f"{name} must be a number in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")


def _callback_inputs() -> list[str]:
    """The tensors diffusers' decoder hands a step callback; diffusers is imported only when they are asked for."""
    from diffusers import KandinskyV22Pipeline

    return KandinskyV22Pipeline._callback_tensor_inputs


def check_controls(controls: Mapping, prompt, subjects, edge_image, output_type: str, pipeline, name) -> int | None:
    """check_inputs' part for supplied embeddings, latents, callbacks, subject scale, edge and img2img knobs.

    Returns the number of supplied image embeddings (None when the prompt is to be encoded).
    """
    unknown = set(controls) - set(CONTROLS)
    if unknown:
        raise TypeError(f"check_inputs() got unexpected keyword arguments {sorted(unknown)}")
    c = {**CONTROLS, **controls}
    embeds, negative = c["image_embeds"], c["negative_image_embeds"]
    count = None
    if embeds is None:
        if negative is not None:
            raise UserError("negative_image_embeds was given without image_embeds; give both, or neither")
        if prompt is None:
            raise UserTypeError("prompt must be a string or a list of strings, got None; pass a text prompt, or "
                                "image_embeds to decode")
    else:
        if prompt is not None or subjects or edge_image is not None:
            raise UserError("image_embeds are decoded as given; drop the prompt, subjects and edge image, or the embeds")
        dim = pipeline.embedding_dim if pipeline is not None else None
        for key, value in (("image_embeds", embeds), ("negative_image_embeds", negative)):
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or value.dim() not in (1, 2) or not value.is_floating_point():
                raise UserError(f"{name(key)} must be a float tensor of shape (N, D) or (D,), got "
                                f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
            if dim is not None and value.shape[-1] != dim:
                raise UserError(f"{name(key)} have dimension {value.shape[-1]}, but this model's decoder takes {dim}; "
                                "give embeddings made by a prior of this model's size")
            if not torch.isfinite(value).all():
                raise UserError(f"{name(key)} hold NaN or infinite values; give finite embeddings")
        count = 1 if embeds.dim() == 1 else embeds.shape[0]
        if count == 0:
            raise UserError(f"{name('image_embeds')} is empty; give at least one embedding")
        if negative is not None and negative.dim() == 2 and negative.shape[0] not in (1, count):
            raise UserError(f"{negative.shape[0]} negative_image_embeds for {count} image_embeds; give one or as many")
    latents = c["latents"]
    if latents is not None and (not isinstance(latents, torch.Tensor) or latents.dim() != 4):
        raise UserError(f"{name('latents')} must be a (N, C, h, w) tensor of initial noise, got "
                        f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}")
    callback, inputs = c["callback_on_step_end"], c["callback_on_step_end_tensor_inputs"]
    if callback is not None and not callable(callback):
        raise UserError(f"callback_on_step_end must be callable, got {type(callback).__name__}")
    if inputs is not None and (not isinstance(inputs, (list, tuple)) or any(k not in _callback_inputs() for k in inputs)):
        allowed = _callback_inputs()
        raise UserError(f"callback_on_step_end_tensor_inputs {inputs!r}: choose among {', '.join(allowed)}")
    scale = c["subject_scale"]
    words = {normalize_subject_word(w) for w in (subjects or {}) if isinstance(w, str)}
    if isinstance(scale, Mapping):
        for word, value in scale.items():
            if not isinstance(word, str) or normalize_subject_word(word) not in words:
                raise UserError(f"subject_scale names {word!r}, which is not a subject; use the subject words")
            _real(value, f"{name('subject_scale')} of {word!r}", 0, 2)
    else:
        _real(scale, name("subject_scale"), 0, 2)
    _real(c["edge_strength"], name("edge_strength"), 0, 2)
    if not isinstance(c["edge_is_map"], bool):
        raise UserError(f"edge_is_map must be True or False, got {c['edge_is_map']!r}")
    _real(c["canny_low"], name("canny_low"), 0, 1000)
    _real(c["canny_high"], name("canny_high"), 0, 1000)
    if c["canny_low"] > c["canny_high"]:
        raise UserError(f"{name('canny_low')} ({c['canny_low']}) is above {name('canny_high')} ({c['canny_high']}); "
                        "give low <= high")
    _real(c["strength"], name("strength"), 0, 1, low_open=True)
    init = c["init_image"]
    if init is not None:
        if not isinstance(init, (str, os.PathLike, Image.Image)):
            raise UserError(f"{name('init_image')} is a {type(init).__name__}; give an image path or a PIL image")
        if latents is not None:
            raise UserError("latents and init_image exclude each other: img2img makes its noise from the image")
    return count
