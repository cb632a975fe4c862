"""The one naming rule for images the package writes: readable, unique per request, never overwriting.

A name is ``<prompt slug>-<hash of prompt, subjects and settings>-seed<seed>.png``: two prompts that share a long
prefix, or have no ASCII letters, still get different names, and an identical request written twice into the same
folder gets ``...-1.png`` rather than replacing the first file (:func:`lambda_eclipse.atomic.write_new_file`).
Each PNG carries what made it in its text metadata, so a file explains itself whatever its name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .atomic import write_new_file

SLUG_LENGTH = 40


def request_hash(*parts: Any) -> str:
    """8 hex digits that change with any of ``parts`` (JSON-serialisable: prompt, subjects, settings)."""
    text = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def image_stem(prompt: str, request: Mapping[str, Any] | None = None, seed: int | None = None) -> str:
    """``<slug>-<hash>[-seed<seed>]``: the slug keeps names readable, the hash of ``(prompt, request)`` unique."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:SLUG_LENGTH].strip("-") or "image"
    stem = f"{slug}-{request_hash(prompt, dict(request or {}))}"
    return stem if seed is None else f"{stem}-seed{seed}"


def save_png(image, directory: str | os.PathLike, stem: str, metadata: Mapping[str, Any] | None = None) -> Path:
    """Save a PIL image as ``directory/stem.png`` (or ``stem-N.png`` if taken), never replacing a file.

    ``metadata`` becomes PNG text chunks; values that are not strings are stored as JSON.
    """
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str))
    return write_new_file(Path(directory) / f"{stem}.png", lambda temporary: image.save(temporary, format="PNG", pnginfo=info))
