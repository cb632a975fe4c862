"""Arithmetic in the CLIP image-embedding space: paths between embeddings, grids of them, and blends.

CLIP embeddings are compared by angle, so the default path between two of them is a great-circle arc (``slerp``)
of their directions, with the norm moved linearly; ``lerp`` is the straight line the released interpolation
script used (FACTS §3). One function, :func:`geodesic_combine`, owns the sphere arithmetic (log and exp maps at a
base point); ``slerp``, the subject scale and the edge strength are all special cases of it, so they agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput

from .errors import UserError

PATHS = ("slerp", "lerp")
SPACINGS = ("uniform", "perceptual")
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


def default_probes(steps: int) -> int:
    """Decodes per line (or grid edge) that ``spacing="perceptual"`` spends placing ``steps`` frames by default."""
    return 5 * (steps - 1) + 1


class ProbedPath:
    """One path between corners as an image encoder sees it: unit features of frames decoded at positions in [0, 1].

    Distances along it are angles between neighbouring probes' features: angles add along a path, where the CLIP-I
    distance (1 - cosine), quadratic in small steps, would shrink wherever probes are dense; and equal angles are
    equal CLIP-I steps, since 1 - cosine grows with the angle.
    """

    def __init__(self, features_at: Callable[[list[float]], torch.Tensor]):
        self.features_at = features_at  # positions -> (N, D) unit features of the frames decoded there
        self.features: dict[float, torch.Tensor] = {}

    def probe(self, ts: Sequence[float]) -> None:
        new = [float(t) for t in dict.fromkeys(ts) if float(t) not in self.features]
        if new:
            self.features.update(zip(new, self.features_at(new)))

    def angles(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions (P,), angles between neighbouring probes (P-1,)), in order of position."""
        ts = np.array(sorted(self.features))
        f = torch.stack([self.features[float(t)] for t in ts]).double()
        return ts, torch.arccos((f[:-1] * f[1:]).sum(-1).clamp(-1.0, 1.0)).numpy()

    def arc(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions (P,), cumulative arc length (P,)) of the probes."""
        ts, angles = self.angles()
        return ts, np.concatenate([[0.0], np.cumsum(angles)])

    def bisect(self, probes: int, first: int) -> None:
        """Probe ``first`` even positions, then bisect the widest steps (up to ``first - 1`` a round) until ``probes``
        positions: probes crowd where the frames change fastest, so the arc there is measured rather than guessed."""
        self.probe(np.linspace(0.0, 1.0, first).tolist())
        while len(self.features) < probes:
            ts, angles = self.angles()
            widest = np.argsort(-angles, kind="stable")[: min(first - 1, probes - len(self.features))]
            self.probe([float(ts[i] + ts[i + 1]) / 2 for i in sorted(widest)])


def even_arc_positions(arcs: Sequence[tuple[np.ndarray, np.ndarray]], frames: int) -> list[float]:
    """``frames`` positions 0 = t_0 < ... < t_{F-1} = 1 at even shares of the arc length.

    ``arcs``: one or more ``(positions, cumulative arc length)`` (:meth:`ProbedPath.arc`); with several (a grid's
    two opposite edges) their arc lengths, each as a share of its own total, are averaged. A path with no length at
    all keeps even positions.
    """
    grid = np.unique(np.concatenate([ts for ts, _ in arcs]))
    shares = [np.interp(grid, ts, arc / arc[-1]) if arc[-1] > 0 else grid for ts, arc in arcs]
    share = np.mean(shares, 0) + 1e-9 * grid  # strictly increasing where frames do not change at all
    share = share / share[-1]
    placed = np.interp(np.linspace(0.0, 1.0, frames), share, grid)
    placed[0], placed[-1] = 0.0, 1.0
    return placed.tolist()


def most_even_frames(distances: np.ndarray, frames: int) -> list[int]:
    """The ``frames`` of P probed frames, first and last included, in order, whose neighbouring CLIP-I distances
    are the most even (smallest largest/mean step), from their (P, P) pairwise ``distances``.

    For every candidate largest step M, a dynamic programme finds the ``frames - 1`` steps of at most M from the
    first probe to the last with the largest total (so the largest mean); the best ratio over all M wins. Exact for
    the probes, with no assumption about what the frames between them look like (a decoder that flips at one point
    gets that flip as one step rather than frames crowded into it). O(P⁴·frames) at worst; P is a few dozen.
    """
    count = len(distances)
    steps = frames - 1
    upper = np.triu(np.ones((count, count), dtype=bool), 1)
    best, best_ratio = list(np.linspace(0, count - 1, frames).round().astype(int)), np.inf
    for limit in np.unique(distances[upper]):
        gain = np.where(upper & (distances <= limit), distances, -np.inf)
        total = np.full(count, -np.inf)
        total[0] = 0.0
        back = []
        for _ in range(steps):
            options = total[:, None] + gain  # (from, to)
            back.append(options.argmax(0))
            total = options.max(0)
        if not np.isfinite(total[-1]) or total[-1] <= 0:
            continue
        path = [count - 1]
        for came_from in reversed(back):
            path.append(int(came_from[path[-1]]))
        path = path[::-1]
        taken = distances[path[:-1], path[1:]]
        ratio = taken.max() / taken.mean()
        if ratio < best_ratio - 1e-12:
            best, best_ratio = path, ratio
    return [int(i) for i in best]


def perceptual_positions(num_corners: int, steps: int, features_at: Callable[[list[tuple[float, float]]], torch.Tensor],
                         probes: int) -> list[tuple[float, float]]:
    """Frame positions at even CLIP-I steps (``spacing="perceptual"``), instead of even path positions.

    Each path (a line, or a grid's four edges) is probed at up to ``probes`` positions: even ones and bisections of
    the widest steps first, then up to two rounds that decode the frames placed at even arc length and add them as
    probes (the arc between sparse probes is an estimate; the placed frames measure it where it matters). A line's
    frames are then the probes whose CLIP-I steps are the most even (:func:`most_even_frames`). A grid's
    columns are placed along its top and bottom edges and its rows along its left and right edges, so it stays a
    product of the two. ``features_at(positions)`` gives the (N, D) unit image features of the frames decoded at
    grid positions.
    """
    if steps == 2:  # the corners alone: nothing to place
        return grid_positions(num_corners, steps)
    rounds = 2
    first = min(steps, probes)
    bisections = max(first, probes - rounds * (steps - 2))

    def probed_along(edge) -> ProbedPath:
        path = ProbedPath(lambda ts: features_at([edge(t) for t in ts]))
        path.bisect(bisections, first)
        for _ in range(rounds):
            placed = even_arc_positions([path.arc()], steps)
            if all(t in path.features for t in placed) or len(path.features) + steps - 2 > probes:
                break
            path.probe(placed)
        return path

    if num_corners == 2:
        path = probed_along(lambda t: (0.0, t))
        ts = sorted(path.features)
        feats = torch.stack([path.features[t] for t in ts]).double()
        chosen = most_even_frames((1 - feats @ feats.T).clamp_min(0).numpy(), steps)
        return [(0.0, ts[i]) for i in chosen]
    paths = [probed_along(edge) for edge in (lambda t: (0.0, t), lambda t: (1.0, t), lambda t: (t, 0.0),
                                                 lambda t: (t, 1.0))]
    columns = even_arc_positions([paths[0].arc(), paths[1].arc()], steps)
    rows = even_arc_positions([paths[2].arc(), paths[3].arc()], steps)
    return [(r, c) for r in rows for c in columns]


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


def check_corners(corners: Sequence, steps: int, path: str, spacing: str = "uniform",
                  probes: int | None = None) -> list[Corner]:
    """The model-independent checks of an interpolation: 2 or 4 corners, ``steps`` >= 2 frames a side, a known path
    and frame spacing, and ``probes`` (None or a whole number >= ``steps``).

    Corners may be :class:`Corner`, a prompt string, a mapping of Corner's fields, or a (D,) tensor.
    """
    if not isinstance(corners, (list, tuple)) or len(corners) not in (2, 4):
        count = len(corners) if isinstance(corners, (list, tuple)) else type(corners).__name__
        raise UserError(f"an interpolation takes 2 corners (a line) or 4 (a grid), got {count}; give 2 or 4")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise UserError(f"steps (frames per side, corners included) must be a whole number >= 2, got {steps!r}")
    if path not in PATHS:
        raise UserError(f"unknown interpolation path {path!r}; choose one of {', '.join(PATHS)}")
    if spacing not in SPACINGS:
        raise UserError(f"unknown frame spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if probes is not None and (isinstance(probes, bool) or not isinstance(probes, int) or probes < steps):
        raise UserError(f"probes (decodes per line or grid edge that place perceptual frames) must be a whole number "
                        f">= the frames per side ({steps}), got {probes!r}")
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
                      spacing: str = "uniform", probes: int | None = None, **controls) -> InterpolationOutput:
    """:meth:`LambdaEclipsePipeline.interpolate`: corner embeddings from the prior, each with a fresh generator of
    ``seed`` (as ``generate --seed``), the path between them, and every frame decoded from that seed's decoder noise,
    so a corner frame is bitwise the image the pipeline's call makes with ``generator=Generator().manual_seed(seed)``.

    ``positions`` (default :func:`grid_positions`) picks frames, e.g. one frame of a grid to regenerate it alone;
    given, they are used as they are. Without them, ``spacing`` "uniform" places frames at even steps of the path
    and "perceptual" at even steps of what the frames look like (:func:`perceptual_positions`: the path decoded at
    ``probes`` positions per line or grid edge, default :func:`default_probes`, and the frames chosen for even
    CLIP-I steps by the pipeline's own image encoder), for animations that do not rush through one part.
    """
    from diffusers.utils.torch_utils import randn_tensor

    from .decoding import decode_image_embeds, decoder_scheduler
    from .encoders import encode_images, zero_image_embedding

    corners = check_corners(corners, steps, path, spacing, probes)
    for c in corners:
        if c.image_embeds is None:
            pipe.check_inputs(c.prompt, c.subjects, c.edge_image, 1, num_inference_steps, guidance_scale, height,
                              width, scheduler, None, output_type, **controls)
        else:
            pipe.check_inputs(None, None, None, 1, num_inference_steps, guidance_scale, height, width, scheduler,
                              None, output_type, image_embeds=c.image_embeds)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be a whole number, got {seed!r}")
    probes = default_probes(steps) if probes is None else probes
    if spacing == "perceptual" and output_type == "embeds" and positions is None:
        raise UserError('spacing="perceptual" places frames by decoding them; it cannot be used with '
                        'output_type="embeds" (give positions, or spacing="uniform")')
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
    negative = zero_image_embedding(pipe.image_encoder).to(dtype)

    def embeds_at(where: Sequence[tuple[float, float]]) -> torch.Tensor:
        out = interpolate_corners(corner_embeds.float(), where, path).to(dtype)
        for k, (r, c) in enumerate(where):  # corners stay bitwise the prior's output (no float32 round trip)
            if r in (0.0, 1.0) and c in (0.0, 1.0):
                out[k] = corner_embeds[int(c) if len(corners) == 2 else int(2 * r + c)]
        return out

    def decoder_generator() -> torch.Generator:
        g = generator()  # the state after the prior's (1, D) noise draw: the decoder noise of the pipeline's call
        randn_tensor((1, dim), generator=g, device=device, dtype=dtype)
        return g

    height, width = pipe._default_size(height, width)
    sched = decoder_scheduler(pipe.scheduler, scheduler)

    def decode(where: Sequence[tuple[float, float]], kind: str) -> list:
        """The frames at ``where``, each from the seed's decoder noise. Corner frames are decoded one at a time, as
        the pipeline's call decodes one image, because a batched convolution may round differently; every other
        frame is decoded in batches."""
        embeds = embeds_at(where)
        corner_frames = [k for k, (r, c) in enumerate(where) if r in (0.0, 1.0) and c in (0.0, 1.0)]
        inner = [k for k in range(len(where)) if k not in corner_frames]
        groups = [[k] for k in corner_frames] + [inner[i : i + batch_size] for i in range(0, len(inner), batch_size)]
        decoded: dict[int, Any] = {}
        for group in groups:
            out = decode_image_embeds(
                pipe.unet, sched, pipe.movq, embeds[group], negative.expand(len(group), -1), height, width,
                num_inference_steps, guidance_scale, [decoder_generator() for _ in group], kind, None,
                getattr(pipe, "_progress_bar_config", {}),
            )
            decoded.update({k: out[j] for j, k in enumerate(group)})
        return [decoded[k] for k in range(len(where))]

    probed: dict[tuple[float, float], Any] = {}  # frames decoded to place the others, kept for the "pil" output
    if positions is not None:
        positions = list(positions)
    elif spacing == "perceptual":
        def features_at(where: list[tuple[float, float]]) -> torch.Tensor:
            images = decode(where, "pil")
            probed.update(zip(where, images))
            return F.normalize(encode_images(pipe.image_processor, pipe.image_encoder, images).float(), dim=-1).cpu()

        positions = perceptual_positions(len(corners), steps, features_at, probes)
    else:
        positions = grid_positions(len(corners), steps)
    frames = embeds_at(positions)
    weights = [bilinear_weights(r, c) for r, c in positions]
    if output_type == "embeds":
        return InterpolationOutput(None, frames, corner_embeds, negative.expand(len(frames), -1), positions, weights)
    decoded = dict(probed) if output_type == "pil" else {}  # a perceptual line's frames are all probes already
    missing = [p for p in positions if p not in decoded]
    if missing:
        decoded.update(zip(missing, decode(missing, output_type)))
    images = [decoded[p] for p in positions]
    if output_type == "np":
        images = np.stack(images)
    elif output_type in ("pt", "latent"):
        images = torch.stack(images)
    pipe.maybe_free_model_hooks()
    return InterpolationOutput(images, frames, corner_embeds, negative.expand(len(frames), -1), positions, weights)
