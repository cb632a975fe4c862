"""Concept images for decoder fine-tuning: find them, prepare them as at inference, encode them once (cached).

Layouts (checked before anything is written):

* a concepts folder with one sub-folder per concept, images inside (DreamBench's ``dataset/``); a folder that
  holds images and no sub-folders is one concept named after it;
* a manifest (YAML or JSON): ``{concept: [image paths]}``, paths relative to the manifest's folder.

Each image is composited on white (as subject images are at inference, :func:`~lambda_eclipse.encoders.prepare_subject_image`),
resized with its aspect kept so its shorter side is the training resolution, and centre-cropped square. The MoVQ
and the CLIP image encoder are frozen, so the (latents, embedding) pairs are computed once and cached under the
run folder, keyed by the images' bytes, the resolution and the encoders.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from ..atomic import atomic_path
from ..encoders import encode_images, load_image, prepare_subject_image
from ..errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ConceptSet:
    """Training images by concept: ``paths[i]`` shows concept ``names[concept[i]]``."""

    names: tuple[str, ...]
    paths: tuple[Path, ...]
    concept: tuple[int, ...]

    def fingerprint(self) -> str:
        """sha256 of every image's concept and bytes, in order (what the cache and resume check key on)."""
        digest = hashlib.sha256()
        for path, index in zip(self.paths, self.concept):
            digest.update(self.names[index].encode() + b"\0" + path.read_bytes())
        return digest.hexdigest()


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def find_concepts(concepts_dir: str | os.PathLike | None = None, manifest: str | os.PathLike | None = None) -> ConceptSet:
    """The training images of a concepts folder or a manifest (exactly one of them), every file opened once.

    Raises:
        UserError: neither or both given, a missing folder, an empty concept, an unreadable image.
    """
    if bool(concepts_dir) == bool(manifest):
        raise UserError("give exactly one of data.concepts_dir (one folder per concept) and data.manifest")
    groups: dict[str, list[Path]] = {}
    if concepts_dir:
        root = Path(concepts_dir)
        if not root.is_dir():
            raise UserError(f"concepts folder {str(root)!r} does not exist; give a folder with one folder per concept")
        subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for folder in subdirs or [root]:
            groups[folder.name] = _images_in(folder)
    else:
        path = Path(manifest)
        if not path.is_file():
            raise UserError(f"manifest {str(path)!r} does not exist; give a YAML/JSON file mapping concept -> images")
        try:
            listed = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise UserError(f"manifest {str(path)!r} is not valid YAML/JSON ({str(error).splitlines()[0]})") from None
        if not isinstance(listed, dict) or not all(isinstance(v, list) for v in listed.values()):
            raise UserError(f"manifest {str(path)!r} must map each concept name to a list of image paths")
        groups = {str(name): [path.parent / str(p) for p in files] for name, files in listed.items()}
    if not groups:
        raise UserError(f"no concepts found in {str(concepts_dir or manifest)!r}; add one folder of images per concept")
    for name, files in groups.items():
        if not files:
            raise UserError(f"concept {name!r} has no images ({', '.join(IMAGE_SUFFIXES)}); add some or remove it")
        for file in files:
            load_image(file, what=f"concept {name!r} image")  # refuses a missing or unreadable file now
    names = tuple(groups)
    pairs = [(p, i) for i, name in enumerate(names) for p in groups[name]]
    return ConceptSet(names, tuple(p for p, _ in pairs), tuple(i for _, i in pairs))


def prepare_training_image(image: Image.Image, size: int) -> Image.Image:
    """White-composited RGB, shorter side resized to ``size`` (aspect kept), centre-cropped to size × size."""
    image = prepare_subject_image(image)
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


@torch.no_grad()
def encode_training_images(images: list[Image.Image], movq, image_processor, image_encoder,
                           batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepared square images -> MoVQ latents (N, C, h, w) of pixels in [-1, 1] (no scaling factor, as Kandinsky)
    and CLIP image embeddings (N, D) by the encoder inference uses for subjects."""
    latents, embeds = [], []
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        pixels = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in chunk])).permute(0, 3, 1, 2)
        pixels = (pixels / 127.5 - 1).to(movq.device, movq.dtype)
        latents.append(movq.encode(pixels).latents.float().cpu())
        embeds.append(encode_images(image_processor, image_encoder, chunk).float().cpu())
    return torch.cat(latents), torch.cat(embeds)


def cached_encoding(concepts: ConceptSet, size: int, encoders_id: str, cache_dir: Path, load_encoders
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (N, C, h, w), embeds (N, D)) of ``concepts`` at ``size``, from ``cache_dir`` when the same images,
    size and encoders were encoded before; else encoded (``load_encoders()`` -> (movq, processor, image encoder))
    and cached atomically."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(f"{concepts.fingerprint()}|{size}|{encoders_id}".encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"encoded-{key}.safetensors"
    if not cache.is_file():
        images = [prepare_training_image(load_image(p), size) for p in concepts.paths]
        latents, embeds = encode_training_images(images, *load_encoders())
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as temporary:
            save_file({"latents": latents.contiguous(), "embeds": embeds.contiguous(),
                       "concept": torch.tensor(concepts.concept)}, str(temporary))
    # Always what the file holds: a fresh encoding can come back in another memory layout (the MoVQ's), and the
    # UNet's kernels round differently on it, so a first run and its resumption would drift apart.
    cached = load_file(str(cache))
    return cached["latents"], cached["embeds"]
