"""Arithmetic in the CLIP image-embedding space: paths between embeddings, grids of them, and blends.

CLIP embeddings are compared by angle, so the default path between two of them is a great-circle arc (``slerp``)
of their directions, with the norm moved linearly; ``lerp`` is the straight line the released interpolation
script used (FACTS §3). One function, :func:`geodesic_combine`, owns the sphere arithmetic (log and exp maps at a
base point); ``slerp``, the subject scale and the edge strength are all special cases of it, so they agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.utils import BaseOutput

from .errors import UserError

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


# ------------------------------------------------------------------------------------------------ the interpolate call
@dataclass
class Corner:
    """One corner of an interpolation: a prompt with its own subjects (and optional edge map), or an embedding.

    Attributes:
        prompt: the corner's prompt (None with ``image_embeds``).
        subjects: subject word -> image(s), as for the pipeline's call.
        edge_image: optional edge map/photo of the corner.
        image_embeds: (D,) a ready embedding (a saved file's, another prior's) instead of the prompt.
        label: how the grid labels the corner (default: the prompt and its subject words).
    """

    prompt: str | None = None
    subjects: dict[str, Any] | None = None
    edge_image: Any = None
    image_embeds: torch.Tensor | None = None
    label: str | None = None

    def describe(self) -> str:
        if self.label:
            return self.label
        if self.prompt is None:
            return "embedding"
        words = ", ".join(self.subjects or {})
        return f"{self.prompt} [{words}]" if words else self.prompt


@dataclass
class InterpolationOutput(BaseOutput):
    """Frames between corners.

    Attributes:
        images: F frames (what ``output_type`` gives, as the pipeline's call), None for "embeds".
        image_embeds: (F, D) the frames' embeddings; corner_embeds: (K, D) the corners' (K = 2 or 4).
        negative_image_embeds: (F, D) the decoder's guidance negatives (zero-image embedding).
        positions: F ``(row, column)`` grid positions in [0, 1]; weights: F dicts of the corners' bilinear weights.
    """

    images: Any
    image_embeds: torch.Tensor
    corner_embeds: torch.Tensor
    negative_image_embeds: torch.Tensor
    positions: list[tuple[float, float]]
    weights: list[dict[str, float]]


def check_corners(corners: Sequence, steps: int, path: str) -> list[Corner]:
    """The model-independent checks of an interpolation: 2 or 4 corners, ``steps`` >= 2 frames a side, a known path.

    Corners may be :class:`Corner`, a prompt string, a mapping of Corner's fields, or a (D,) tensor.
    """
    if not isinstance(corners, (list, tuple)) or len(corners) not in (2, 4):
        count = len(corners) if isinstance(corners, (list, tuple)) else type(corners).__name__
        raise UserError(f"an interpolation takes 2 corners (a line) or 4 (a grid), got {count}; give 2 or 4")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise UserError(f"steps (frames per side, corners included) must be a whole number >= 2, got {steps!r}")
    if path not in PATHS:
        raise UserError(f"unknown interpolation path {path!r}; choose one of {', '.join(PATHS)}")
    out = []
    for k, corner in enumerate(corners):
        if isinstance(corner, Corner):
            out.append(corner)
        elif isinstance(corner, str):
            out.append(Corner(prompt=corner))
        elif isinstance(corner, torch.Tensor):
            out.append(Corner(image_embeds=corner))
        elif isinstance(corner, Mapping):
            unknown = set(corner) - {"prompt", "subjects", "edge_image", "image_embeds", "label"}
            if unknown:
                raise UserError(f"corner {k + 1} has unknown keys {sorted(unknown)}; use prompt, subjects, edge_image, "
                                "image_embeds, label")
            out.append(Corner(**corner))
        else:
            raise UserError(f"corner {k + 1} is a {type(corner).__name__}; give a prompt, a Corner or a (D,) embedding")
    dims = {c.image_embeds.shape[-1] for c in out if isinstance(c.image_embeds, torch.Tensor)}
    if len(dims) > 1:
        raise UserError(f"the corners' embeddings have different sizes {sorted(dims)}: they come from priors of "
                        "different sizes; give corners from one model")
    return out


@torch.no_grad()
def run_interpolation(pipe, corners: Sequence, steps: int = 5, path: str = "slerp", seed: int = 0,
                      num_inference_steps: int = 50, guidance_scale: float = 7.5, height: int | None = None,
                      width: int | None = None, scheduler: str | None = None, output_type: str = "pil",
                      positions: Sequence[tuple[float, float]] | None = None, batch_size: int = 8,
                      **controls) -> InterpolationOutput:
    """:meth:`LambdaEclipsePipeline.interpolate`: corner embeddings from the prior, each with a fresh generator of
    ``seed`` (as ``generate --seed``), the path between them, and every frame decoded from that seed's decoder noise,
    so a corner frame is bitwise the image the pipeline's call makes with ``generator=Generator().manual_seed(seed)``.

    ``positions`` (default :func:`grid_positions`) picks frames, e.g. one frame of a grid to regenerate it alone.
    """
    from diffusers.utils.torch_utils import randn_tensor

    from .decoding import decode_image_embeds, decoder_scheduler
    from .encoders import zero_image_embedding

    corners = check_corners(corners, steps, path)
    for c in corners:
        if c.image_embeds is None:
            pipe.check_inputs(c.prompt, c.subjects, c.edge_image, 1, num_inference_steps, guidance_scale, height,
                              width, scheduler, None, output_type, **controls)
        else:
            pipe.check_inputs(None, None, None, 1, num_inference_steps, guidance_scale, height, width, scheduler,
                              None, output_type, image_embeds=c.image_embeds)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be a whole number, got {seed!r}")
    dim, dtype, device = pipe.embedding_dim, pipe.prior.dtype, pipe._execution_device

    def generator() -> torch.Generator:
        return torch.Generator("cpu").manual_seed(seed)

    embeds = []
    for c in corners:
        if c.image_embeds is not None:
            embeds.append(c.image_embeds.reshape(-1).to(device, dtype))
        else:
            embeds.append(pipe._prior_embeddings(c.prompt, c.subjects, c.edge_image, 1, [generator()],
                                                 **controls).image_embeds[0])
    corner_embeds = torch.stack(embeds)
    positions = list(positions) if positions is not None else grid_positions(len(corners), steps)
    frames = interpolate_corners(corner_embeds.float(), positions, path).to(dtype)
    for k, (r, c) in enumerate(positions):  # corners stay bitwise the prior's output (no float32 round trip)
        if r in (0.0, 1.0) and c in (0.0, 1.0):
            frames[k] = corner_embeds[int(c) if len(corners) == 2 else int(2 * r + c)]
    negative = zero_image_embedding(pipe.image_encoder).to(dtype).expand(len(frames), -1)
    weights = [bilinear_weights(r, c) for r, c in positions]
    if output_type == "embeds":
        return InterpolationOutput(None, frames, corner_embeds, negative, positions, weights)

    def decoder_generator() -> torch.Generator:
        g = generator()  # the state after the prior's (1, D) noise draw: the decoder noise of the pipeline's call
        randn_tensor((1, dim), generator=g, device=device, dtype=dtype)
        return g

    height, width = pipe._default_size(height, width)
    sched = decoder_scheduler(pipe.scheduler, scheduler)
    # Corner frames are decoded one at a time, as the pipeline's call decodes one image, because a batched
    # convolution may round differently; every other frame is decoded in batches.
    corner_frames = [k for k, (r, c) in enumerate(positions) if r in (0.0, 1.0) and c in (0.0, 1.0)]
    inner = [k for k in range(len(positions)) if k not in corner_frames]
    groups = [[k] for k in corner_frames] + [inner[i : i + batch_size] for i in range(0, len(inner), batch_size)]
    decoded: dict[int, Any] = {}
    for group in groups:
        out = decode_image_embeds(
            pipe.unet, sched, pipe.movq, frames[group], negative[: len(group)], height, width, num_inference_steps,
            guidance_scale, [decoder_generator() for _ in group], output_type, None,
            getattr(pipe, "_progress_bar_config", {}),
        )
        decoded.update({k: out[j] for j, k in enumerate(group)})
    images = [decoded[k] for k in range(len(positions))]
    if output_type == "np":
        images = np.stack(images)
    elif output_type in ("pt", "latent"):
        images = torch.stack(images)
    pipe.maybe_free_model_hooks()
    return InterpolationOutput(images, frames, corner_embeds, negative, positions, weights)
