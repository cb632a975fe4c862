"""Pixel-level drawing of the miniature world: silhouettes, textures and backgrounds (numpy only).

Everything draws on a supersampled canvas (``scale`` × the output size) with hard edges; the scene
renderer box-filters the canvas down, which anti-aliases edges and stripes for free.
"""

from __future__ import annotations

import numpy as np

from .vocab import BG_COLOURS, COLOURS

# Polygons in normalized object coordinates (u right, v down, both in [-1, 1]).
_STAR = np.array(
    [
        (np.sin(a) * r, -np.cos(a) * r)
        for a, r in zip(np.linspace(0, 2 * np.pi, 10, endpoint=False), [1.0, 0.42] * 5)
    ]
)
_CONE = np.array([(0.0, -1.0), (0.55, 0.62), (-0.55, 0.62)])  # the base bar is added separately
_PLANE = np.array([(1.0, 0.0), (-1.0, -0.8), (-0.35, 0.0), (-1.0, 0.8)])  # a dart seen from above


def _in_polygon(u: np.ndarray, v: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorized over points. u, v: (H, W); poly: (K, 2) -> (H, W) bool."""
    inside = np.zeros(u.shape, dtype=bool)
    k = len(poly)
    for i in range(k):
        (x0, y0), (x1, y1) = poly[i], poly[(i + 1) % k]
        if y0 == y1:
            continue
        crosses = (y0 > v) != (y1 > v)
        x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Silhouette of ``shape`` at normalized coordinates. u, v: (H, W) floats -> (H, W) bool."""
    if shape == "ball":
        return u * u + v * v <= 1.0
    if shape == "box":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.5**2)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    if shape == "star":
        return _in_polygon(u, v, _STAR)
    if shape == "heart":
        x, y = u * 1.2, -(v * 1.2) + 0.25  # the classic implicit heart, scaled to fill the box
        return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    if shape == "cone":
        base = (np.abs(u) <= 0.9) & (v >= 0.62) & (v <= 0.95)
        return _in_polygon(u, v, _CONE) | base
    if shape == "paper plane":
        return _in_polygon(u, v, _PLANE)
    raise ValueError(f"unknown shape {shape!r}")


def contrast_colour(rgb: np.ndarray) -> np.ndarray:
    """The second colour of a texture: a pale tint of a dark colour, a dark shade of a light one."""
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return rgb * 0.35 if luminance > 150 else rgb * 0.3 + 255.0 * 0.7


def texture_pattern(texture: str, x: np.ndarray, y: np.ndarray, period: float) -> np.ndarray:
    """Where the second texture colour goes. x, y: (H, W) output-pixel coordinates -> (H, W) bool.

    Coordinates are relative to the object's box, so the pattern travels with the object.
    """
    half = period / 2.0
    if texture == "plain":
        return np.zeros(x.shape, dtype=bool)
    if texture == "striped":
        return (np.floor((x + y) / half) % 2) == 1
    if texture == "checkered":
        return ((np.floor(x / half) + np.floor(y / half)) % 2) == 1
    if texture == "dotted":
        dx = (x % period) - half
        dy = (y % period) - half
        return dx * dx + dy * dy <= (0.32 * period) ** 2
    raise ValueError(f"unknown texture {texture!r}")


def background(colour: str, kind: str, size: int, scale: int, rng: np.random.Generator) -> np.ndarray:
    """The background canvas. Returns (size·scale, size·scale, 3) float32 in [0, 255]."""
    n = size * scale
    base = np.asarray(BG_COLOURS[colour], dtype=np.float32)
    canvas = np.broadcast_to(base, (n, n, 3)).copy()
    if kind == "plain":
        return canvas
    if kind == "gradient":
        # light at the top, dark at the bottom: a direction the decoder has to get right
        ramp = np.linspace(1.3, 0.6, n, dtype=np.float32)[:, None, None]
        return np.clip(canvas * ramp, 0, 255)
    if kind == "grid":
        cell = max(2, size // 4) * scale
        line = max(1, size // 32) * scale
        ys, xs = np.mgrid[0:n, 0:n]
        on = ((ys % cell) < line) | ((xs % cell) < line)
        canvas[on] = contrast_colour(base)
        return canvas
    if kind == "noisy":
        block = max(1, size // 16)  # blocky noise in output pixels, so it survives the box filter
        cells = -(-size // block)
        noise = rng.normal(0.0, 28.0, size=(cells, cells, 1)).astype(np.float32)
        noise = np.repeat(np.repeat(noise, block * scale, axis=0), block * scale, axis=1)[:n, :n]
        return np.clip(canvas + noise, 0, 255)
    raise ValueError(f"unknown background kind {kind!r}")


def paint_rgb(colour: str | tuple[float, float, float]) -> np.ndarray:
    """(3,) float32 RGB in [0, 255] of a palette colour name or an (r, g, b) triple."""
    return np.asarray(COLOURS[colour] if isinstance(colour, str) else colour, dtype=np.float32)


def paint_object(
    canvas: np.ndarray,
    shape: str,
    colour: str | tuple[float, float, float],
    texture: str,
    box: tuple[float, float, float, float],
    size: int,
    scale: int,
) -> np.ndarray:
    """Paint one object into ``canvas`` (n, n, 3) float32 in place; ``box`` (x0, y0, x1, y1) in output px;
    ``colour`` is a palette name or an (r, g, b) triple in [0, 255].

    Returns the object's hard silhouette on the canvas grid, (n, n) bool.
    """
    n = canvas.shape[0]
    x0, y0, x1, y1 = box
    cx, cy, half = (x0 + x1) / 2.0, (y0 + y1) / 2.0, (x1 - x0) / 2.0
    # only the canvas window covering the box is evaluated: the object is small
    c0, r0 = max(0, int(np.floor(x0 * scale))), max(0, int(np.floor(y0 * scale)))
    c1, r1 = min(n, int(np.ceil(x1 * scale))), min(n, int(np.ceil(y1 * scale)))
    ys, xs = np.mgrid[r0:r1, c0:c1].astype(np.float32)
    px, py = (xs + 0.5) / scale, (ys + 0.5) / scale  # centre of each canvas cell, in output pixels
    local = shape_mask(shape, (px - cx) / half, (py - cy) / half)
    rgb = paint_rgb(colour)
    second = texture_pattern(texture, px - x0, py - y0, period=max(4.0, size / 8.0))
    window = canvas[r0:r1, c0:c1]
    window[local & ~second] = rgb
    window[local & second] = contrast_colour(rgb)
    full = np.zeros((n, n), dtype=bool)
    full[r0:r1, c0:c1] = local
    return full
