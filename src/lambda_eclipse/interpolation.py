"""Arithmetic in the CLIP image-embedding space: paths between embeddings, grids of them, and blends.

CLIP embeddings are compared by angle, so the default path between two of them is a great-circle arc (``slerp``)
of their directions, with the norm moved linearly; ``lerp`` is the straight line the released interpolation
script used (FACTS §3). One function, :func:`geodesic_combine`, owns the sphere arithmetic (log and exp maps at a
base point); ``slerp``, the subject scale and the edge strength are all special cases of it, so they agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PATHS = ("slerp", "lerp")
_EPS = 1e-7


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., D) -> unit directions (..., D) and norms (..., 1)."""
    norm = x.norm(dim=-1, keepdim=True)
    return x / norm.clamp_min(_EPS), norm


def geodesic_combine(base: torch.Tensor, targets: Sequence[torch.Tensor], weights: Sequence[float | torch.Tensor]) -> torch.Tensor:
    """``exp_base(Σ_j w_j · log_base(target_j))`` on the unit sphere, with the norm ``|base| + Σ_j w_j (|t_j| - |base|)``.

    With one target this is slerp (``w`` = the fraction of the arc; w > 1 extrapolates along it). Several targets
    add their tangent vectors at ``base``; with linear weights it is exact at every ``w_j`` in {0, 1} for one
    target and gives ``base`` when every weight is 0.

    Args:
        base: (..., D); targets: each (..., D); weights: floats or tensors broadcastable to (..., 1).

    Returns:
        (..., D) in the dtype of ``base`` (computed in float32, or float64 for float64 inputs).
    """
    dtype = base.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    p, r0 = _split(base.to(work))
    tangent = torch.zeros_like(p)
    radius = r0.clone()
    for target, weight in zip(targets, weights):
        q, r = _split(target.to(work))
        w = torch.as_tensor(weight, dtype=work, device=p.device)
        w = w.reshape(*w.shape, 1) if w.dim() and w.shape[-1] != 1 else w
        cos = (p * q).sum(-1, keepdim=True).clamp(-1.0, 1.0)
        theta = torch.arccos(cos)
        along = q - cos * p  # the component of q orthogonal to p, of length sin θ
        # log_p(q) = θ · along / sin θ; near θ = 0 the ratio tends to 1 (and `along` to q - p).
        scale = torch.where(theta > 1e-4, theta / torch.sin(theta).clamp_min(_EPS), torch.ones_like(theta))
        tangent = tangent + w * scale * along
        radius = radius + w * (r - r0)
    angle = tangent.norm(dim=-1, keepdim=True)
    direction = torch.cos(angle) * p + torch.sin(angle) * tangent / angle.clamp_min(_EPS)
    direction = torch.where(angle > 1e-12, direction, p)
    return (direction / direction.norm(dim=-1, keepdim=True).clamp_min(_EPS) * radius).to(dtype)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Great-circle path from ``a`` (t=0) to ``b`` (t=1) of the directions, norm moved linearly; (..., D)."""
    return geodesic_combine(a, [b], [t])


def lerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Straight line from ``a`` (t=0) to ``b`` (t=1): the released interpolation script's path; (..., D)."""
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)
    t = t.reshape(*t.shape, 1) if t.dim() and t.shape[-1] != 1 else t
    return a + t * (b - a)


def path_function(path: str):
    """"slerp" or "lerp" -> the function."""
    return {"slerp": slerp, "lerp": lerp}[path]


def grid_positions(num_corners: int, steps: int) -> list[tuple[float, float]]:
    """Frame positions ``(row, column)`` in [0, 1]²: a line of ``steps`` frames (2 corners; row 0) or a
    ``steps × steps`` grid in row-major order (4 corners); the first and last of each side are the corners."""
    ts = [k / (steps - 1) for k in range(steps)]
    if num_corners == 2:
        return [(0.0, t) for t in ts]
    return [(r, c) for r in ts for c in ts]


def bilinear_weights(row: float, column: float) -> dict[str, float]:
    """The corners' weights of a grid position (exactly the mixing weights of the lerp path)."""
    return {"top_left": (1 - row) * (1 - column), "top_right": (1 - row) * column,
            "bottom_left": row * (1 - column), "bottom_right": row * column}


def interpolate_corners(corners: torch.Tensor, positions: Sequence[tuple[float, float]], path: str = "slerp") -> torch.Tensor:
    """Embeddings at grid positions between corner embeddings.

    Args:
        corners: (2, D) (start, end: a line; the row is ignored) or (4, D) (top-left, top-right, bottom-left,
            bottom-right), as the released script: down each side first, then across.
        positions: ``(row, column)`` pairs in [0, 1] (:func:`grid_positions`).
        path: "slerp" or "lerp" (with lerp the result is exactly the bilinear mix of :func:`bilinear_weights`).

    Returns:
        (F, D), one row per position; a corner position returns that corner exactly.
    """
    go = path_function(path)
    rows = torch.tensor([p[0] for p in positions], dtype=corners.dtype, device=corners.device)[:, None]
    cols = torch.tensor([p[1] for p in positions], dtype=corners.dtype, device=corners.device)[:, None]
    if len(corners) == 2:
        start, end = corners[0].expand(len(positions), -1), corners[1].expand(len(positions), -1)
    else:
        start = go(corners[0].expand(len(positions), -1), corners[2].expand(len(positions), -1), rows)
        end = go(corners[1].expand(len(positions), -1), corners[3].expand(len(positions), -1), rows)
    out = go(start, end, cols)
    # Exact corners (the arithmetic above may differ from a corner by float rounding): a corner frame is then
    # bitwise the embedding `generate` decodes.
    for k, (r, c) in enumerate(positions):
        if r in (0.0, 1.0) and c in (0.0, 1.0):
            index = int(c) if len(corners) == 2 else int(2 * r + c)
            out[k] = corners[index]
    return out


def normalized_mean(embeds: torch.Tensor) -> torch.Tensor:
    """(M, D) embeddings of one subject's pictures -> (D,): the mean of their directions, at their mean norm.

    One picture returns its own embedding unchanged, so a subject given one image or a list of one is the same.
    """
    if len(embeds) == 1:
        return embeds[0]
    directions, norms = _split(embeds.float())
    mean = directions.mean(0)
    return (mean / mean.norm().clamp_min(_EPS) * norms.mean()).to(embeds.dtype)


def layered_scales(scales: Sequence[float]) -> tuple[list[int], list[float]]:
    """Per-subject scales -> nested subject sets and their weights for :func:`geodesic_combine`.

    Subjects sorted by scale, descending (``order``); set j binds the first j+1 of them and gets weight
    ``s_(j) - s_(j+1)`` (with s_(k+1) = 0). Equal scales s give one set, all subjects, with weight s: the slerp
    between the text-only and the all-bound prediction; a subject at 0 is never bound, one at 1 with the others at 0
    is bound alone. Returns ``(order, weights)`` with ``len(weights) == len(order)``.
    """
    order = sorted(range(len(scales)), key=lambda i: -scales[i])
    ranked = [float(scales[i]) for i in order] + [0.0]
    return order, [ranked[j] - ranked[j + 1] for j in range(len(order))]
