"""Frozen CLIP encoders: prompt token states, subject/edge image embeddings and the zero-image embedding.

At paper scale these are CLIP ViT-bigG/14 (``kandinsky-community/kandinsky-2-2-prior`` subfolders
``text_encoder``, ``image_encoder``, ``tokenizer``, ``image_processor``); the miniature world uses a tiny CLIP
of the same classes. The functions take the modules as arguments so that the pipeline, the dataset builder and
the evaluation share one implementation.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

ImageInput = Union[str, os.PathLike, Image.Image]

# A subject picture larger than this is refused rather than decoded (PIL's decompression-bomb guard).
MAX_IMAGE_PIXELS = 8192 * 8192


def load_image(source: ImageInput, what: str = "image") -> Image.Image:
    """Open an image from a path or PIL image, applying EXIF orientation and fully decoding it.

    Raises:
        UserError: missing, unreadable, non-image, truncated or decompression-bomb files.
    """
    if isinstance(source, Image.Image):
        return ImageOps.exif_transpose(source)
    path = Path(source)
    if not path.exists():
        raise UserError(f"{what} file {str(path)!r} does not exist; check the path")
    if path.is_dir():
        raise UserError(f"{what} path {str(path)!r} is a folder; give an image file")
    previous = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()  # decode now so that truncated files fail here, not mid-pipeline
                image = ImageOps.exif_transpose(opened)
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{what} file {str(path)!r} is too large (over {MAX_IMAGE_PIXELS} pixels); resize it") from None
    except UnidentifiedImageError:
        raise UserError(f"{what} file {str(path)!r} is not an image PIL can read; give a PNG or JPEG") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise UserError(f"{what} file {str(path)!r} cannot be decoded ({error}); re-save or replace it") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    return image


def prepare_subject_image(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, with transparency composited on white (the paper segments subjects onto white)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def canny_edges(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edge map as the released code makes it: grayscale -> cv2.Canny(100, 200) -> RGB."""
    import cv2  # opencv is a core dependency, imported lazily to keep `import lambda_eclipse` light

    gray = np.asarray(prepare_subject_image(image).convert("L"))
    return Image.fromarray(cv2.Canny(gray, low, high)).convert("RGB")


@dataclass
class TextEncoding:
    """Encoded prompts.

    Attributes:
        token_states: (B, L, D) last-layer (final layer-norm) token states, L = the encoder's context length.
        attention_mask: (B, L) bool, True for real tokens.
        pooled: (B, D) projected pooled text embedding.
    """

    token_states: torch.Tensor
    attention_mask: torch.Tensor
    pooled: torch.Tensor


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where a module computes: the execution device of its accelerate offload hook when it is offloaded (its
    weights then sit on the host, or on "meta" under sequential offload), else the device of its weights."""
    for sub in module.modules():
        device = getattr(getattr(sub, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device)
    return module.device


def text_context_length(tokenizer, text_encoder) -> int:
    """The number of token positions the text encoder takes (77 for CLIP)."""
    return min(int(tokenizer.model_max_length), int(text_encoder.config.max_position_embeddings))


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: list[str]) -> TextEncoding:
    """Tokenize (padded to the context length) and encode prompts with a ``CLIPTextModelWithProjection``."""
    length = text_context_length(tokenizer, text_encoder)
    tokens = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    device = execution_device(text_encoder)
    out = text_encoder(input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))
    return TextEncoding(out.last_hidden_state, tokens.attention_mask.to(device).bool(), out.text_embeds)


@torch.no_grad()
def encode_images(image_processor, image_encoder, images: list[Image.Image]) -> torch.Tensor:
    """(N,) PIL images -> (N, D) projected CLIP image embeddings (``CLIPVisionModelWithProjection.image_embeds``)."""
    pixels = image_processor(images=[prepare_subject_image(i) for i in images], return_tensors="pt").pixel_values
    return image_encoder(pixel_values=pixels.to(execution_device(image_encoder), image_encoder.dtype)).image_embeds


@torch.no_grad()
def zero_image_embedding(image_encoder, image_size: int | None = None) -> torch.Tensor:
    """(1, D) embedding of an all-zero *normalised* pixel tensor: the negative for the decoder's guidance and the
    control embedding when there is no edge map (as the released pipeline and diffusers' Kandinsky prior do)."""
    size = image_size or image_encoder.config.image_size
    zeros = torch.zeros(1, 3, size, size, device=execution_device(image_encoder), dtype=image_encoder.dtype)
    return image_encoder(pixel_values=zeros).image_embeds


def edge_embedding(image_processor, image_encoder, image: Image.Image, low: float = 100, high: float = 200,
                   is_map: bool = False) -> torch.Tensor:
    """(1, D) CLIP image embedding of the image's Canny edge map (the control token's input); ``is_map``: the
    image already is an edge map, encoded as is (any mode, made RGB) rather than Canny'd twice."""
    return encode_images(image_processor, image_encoder, [image if is_map else canny_edges(image, low, high)])
