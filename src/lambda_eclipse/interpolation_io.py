"""Writing an interpolation: the frames (each PNG naming its corners and weights), a grid with labelled corners,
an animated GIF of a line, and the embeddings (safetensors). Every file goes through :mod:`lambda_eclipse.atomic`
(frames and grid through :func:`lambda_eclipse.outputs.save_png`), never replacing one already there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from .atomic import write_new_file
from .interpolation import Corner, InterpolationOutput
from .outputs import image_stem, save_png

LABEL_HEIGHT = 14


def corner_record(corner: Corner, seed: int) -> dict[str, Any]:
    """What regenerates a corner: its prompt, subjects (paths as given), edge map and seed (JSON-serialisable)."""
    def name(value):
        if isinstance(value, (list, tuple)):
            return [name(v) for v in value]
        return str(value) if isinstance(value, (str, os.PathLike)) else type(value).__name__

    return {"prompt": corner.prompt, "subjects": {w: name(v) for w, v in (corner.subjects or {}).items()},
            "edge": None if corner.edge_image is None else name(corner.edge_image), "seed": seed,
            "label": corner.describe()}


def grid_image(images: Sequence[Image.Image], columns: int, labels: Sequence[str], scale: int = 1) -> Image.Image:
    """Frames in rows of ``columns``, with a strip above and below naming the corners (2 labels: start at the top
    left, end at the bottom right; 4: top-left, top-right, bottom-left, bottom-right); ``scale`` enlarges the frames
    (nearest neighbour, for small images)."""
    if scale != 1:
        images = [i.resize((i.width * scale, i.height * scale), Image.Resampling.NEAREST) for i in images]
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (w * columns, h * rows + 2 * LABEL_HEIGHT), "white")
    for k, image in enumerate(images):
        sheet.paste(image.convert("RGB"), ((k % columns) * w, LABEL_HEIGHT + (k // columns) * h))
    draw = ImageDraw.Draw(sheet)
    places = {0: (2, 1, "la"), 1: (sheet.width - 2, 1, "ra"), 2: (2, sheet.height - 1, "ld"),
              3: (sheet.width - 2, sheet.height - 1, "rd")}
    order = [0, 3] if len(labels) == 2 else [0, 1, 2, 3]
    for label, place in zip(labels, order):
        x, y, anchor = places[place]
        draw.text((x, y), _fit(draw, label, sheet.width // (1 if len(labels) == 2 else 2) - 4), fill="black",
                  anchor=anchor)
    return sheet


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """``text`` shortened with an ellipsis to fit ``width`` px."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def write_interpolation(result: InterpolationOutput, corners: Sequence[Corner], out: str | os.PathLike,
                        settings: Mapping[str, Any], seed: int, path: str, steps: int,
                        gif_ms: int = 200) -> dict[str, Any]:
    """Write ``result`` (PIL frames) into ``out``; returns ``{"frames": [...], "grid": path, "gif": path | None,
    "embeddings": path}``.

    Each frame's metadata holds the corners, the path, its ``(row, column)`` position and bilinear weights, the
    seed and settings, so ``pipe.interpolate(corners, positions=[position], ...)`` regenerates it alone.
    """
    from safetensors.torch import save_file

    records = [corner_record(c, seed) for c in corners]
    request = {"corners": records, "path": path, "steps": steps, **settings}
    title = " -> ".join(r["label"] for r in records)
    stem = image_stem(title, request, seed)
    frames = []
    for k, (image, position, weights) in enumerate(zip(result.images, result.positions, result.weights)):
        metadata = {"corners": records, "path": path, "position": list(position), "weights": weights,
                    "seed": str(seed), "settings": dict(settings), "frame": k}
        frames.append(save_png(image, out, f"{stem}-frame{k:03d}", metadata))
    columns = len(result.images) if len(corners) == 2 else steps
    grid = grid_image(result.images, columns, [r["label"] for r in records])
    grid_path = save_png(grid, out, f"{stem}-grid", {"corners": records, "path": path, "seed": str(seed),
                                                     "settings": dict(settings)})
    gif_path = None
    if len(corners) == 2:
        first, rest = result.images[0].convert("RGB"), [i.convert("RGB") for i in result.images[1:]]
        gif_path = write_new_file(Path(out) / f"{stem}.gif", lambda temporary: first.save(
            temporary, format="GIF", save_all=True, append_images=rest, duration=gif_ms, loop=0))
    tensors = {"image_embeds": result.image_embeds.float().cpu().contiguous(),
               "corner_embeds": result.corner_embeds.float().cpu().contiguous(),
               "negative_image_embeds": result.negative_image_embeds[:1].float().cpu().contiguous()}
    meta = {"corners": json.dumps(records, ensure_ascii=False), "positions": json.dumps(result.positions),
            "path": path, "seed": str(seed)}
    embeddings = write_new_file(Path(out) / f"{stem}-embeds.safetensors",
                                lambda temporary: save_file(tensors, str(temporary), metadata=meta))
    return {"frames": frames, "grid": grid_path, "gif": gif_path, "embeddings": embeddings}
