"""Interpolation: paths on the sphere, grid weights, corners exact, the pipeline's interpolate and its files."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lambda_eclipse import UserError
from lambda_eclipse.interpolation import (
    Corner, bilinear_weights, even_arc_positions, geodesic_combine, grid_positions, interpolate_corners, lerp,
    ProbedPath, most_even_frames, perceptual_positions, slerp,
)


def test_slerp_stays_on_the_sphere_and_hits_its_ends():
    a, b = F.normalize(torch.randn(2, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    ts = torch.linspace(0, 1, 9)[:, None]
    path = slerp(a.expand(9, -1), b.expand(9, -1), ts)
    assert torch.allclose(path.norm(dim=-1), torch.ones(9), atol=1e-6)
    assert torch.allclose(path[0], a, atol=1e-6) and torch.allclose(path[-1], b, atol=1e-6)
    angles = torch.arccos((path[:-1] * path[1:]).sum(-1).clamp(-1, 1))
    assert torch.allclose(angles, angles.mean().expand(8), atol=1e-5)  # even steps along the arc
    # norms move linearly; lerp's midpoint is shorter than the arc's (the chord)
    mid = slerp(a * 2, b * 4, 0.5)
    assert float(mid.norm()) == pytest.approx(3.0, abs=1e-5)
    assert float(lerp(a, b, 0.5).norm()) < float(slerp(a, b, 0.5).norm())
    assert torch.allclose(geodesic_combine(a, [b], [0.0]), a, atol=1e-6)


def test_grid_corners_exact_and_lerp_is_bilinear():
    corners = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)) * 3
    positions = grid_positions(4, 3)
    assert len(positions) == 9 and positions[0] == (0.0, 0.0) and positions[-1] == (1.0, 1.0)
    for path in ("slerp", "lerp"):
        frames = interpolate_corners(corners, positions, path)
        for k, index in ((0, 0), (2, 1), (6, 2), (8, 3)):
            assert torch.equal(frames[k], corners[index])
    frames = interpolate_corners(corners, positions, "lerp")
    for k, (r, c) in enumerate(positions):
        w = bilinear_weights(r, c)
        mix = (w["top_left"] * corners[0] + w["top_right"] * corners[1] + w["bottom_left"] * corners[2]
               + w["bottom_right"] * corners[3])
        assert torch.allclose(frames[k], mix, atol=1e-5)
    line = interpolate_corners(corners[:2], grid_positions(2, 4), "slerp")
    assert len(line) == 4 and torch.equal(line[0], corners[0]) and torch.equal(line[-1], corners[1])



def circle_features(angle_of):
    """features_at for a path whose frames' features turn by angle_of(t) (radians) in one plane."""
    def features_at(ts):
        angles = torch.tensor([angle_of(t) for t in ts], dtype=torch.float64)
        return torch.stack([torch.cos(angles), torch.sin(angles), torch.zeros_like(angles)], -1)
    return features_at


def test_perceptual_spacing_evens_the_frames_steps():
    calls = []

    def angle_of(t):  # most of the change in the last third of the path
        return 1.2 * t**4

    def features_at(ts):
        calls.append(len(ts))
        return circle_features(angle_of)(ts)

    path = ProbedPath(features_at)
    path.bisect(probes=25, first=7)
    ts, arc = path.arc()
    assert len(ts) == 25 == sum(calls) and ts[0] == 0 and ts[-1] == 1 and np.all(np.diff(ts) > 0)
    assert arc[-1] == pytest.approx(1.2, abs=1e-9)  # angles add up to the path's whole turn
    assert (ts > 0.5).sum() > (ts < 0.5).sum()  # the bisections went where the frames change fastest
    placed = even_arc_positions([(ts, arc)], 7)
    assert placed[0] == 0.0 and placed[-1] == 1.0 and np.all(np.diff(placed) > 0)
    even_steps = np.diff([angle_of(t) for t in placed])
    uniform_steps = np.diff([angle_of(t) for t in np.linspace(0, 1, 7)])
    assert even_steps.max() / even_steps.mean() < 1.1 < 2 < uniform_steps.max() / uniform_steps.mean()
    calls.clear()
    line = [c for _, c in perceptual_positions(2, 7, lambda where: features_at([c for _, c in where]), 31)]
    assert sum(calls) <= 31 and line[0] == 0 and line[-1] == 1  # the decode budget holds, refinements included
    line_steps = np.diff([angle_of(t) for t in line])
    assert line_steps.max() / line_steps.mean() < 1.1
    # a grid: columns from its top and bottom edges (averaged shares), rows from its left and right edges
    def grid_features(where):
        r, c = torch.tensor(where, dtype=torch.float64).T
        across, down = 1.2 * ((1 - r) * c**4 + r * c**2), 1.2 * r  # the sides turn evenly, top and bottom do not
        return torch.stack([torch.cos(across) * torch.cos(down), torch.sin(across) * torch.cos(down), torch.sin(down)], -1)

    grid = perceptual_positions(4, 5, grid_features, 17)
    rows, columns = sorted({r for r, _ in grid}), sorted({c for _, c in grid})
    assert len(grid) == 25 and grid[0] == (0.0, 0.0) and grid[-1] == (1.0, 1.0)
    assert np.allclose(rows, np.linspace(0, 1, 5), atol=0.02)  # both side edges turn evenly
    share = (np.array(columns) ** 4 + np.array(columns) ** 2) / 2  # the mean of the top's and the bottom's shares
    assert np.allclose(np.diff(share), 0.25, atol=0.03)
    assert perceptual_positions(2, 2, features_at, 5) == [(0.0, 0.0), (0.0, 1.0)]  # two frames: the corners alone


def test_most_even_frames_is_the_best_subsequence_and_takes_a_flip_as_one_step():
    from itertools import combinations

    def ratio(d, chosen):
        taken = d[chosen[:-1], chosen[1:]]
        return taken.max() / taken.mean()

    rng = np.random.default_rng(0)
    for trial in range(20):
        feats = F.normalize(torch.from_numpy(rng.normal(size=(9, 5))), dim=-1)
        d = (1 - feats @ feats.T).numpy()
        chosen = most_even_frames(d, 4)
        brute = min(ratio(d, [0, *inner, 8]) for inner in combinations(range(1, 8), 2))
        assert chosen[0] == 0 and chosen[-1] == 8 and np.all(np.diff(chosen) > 0)
        assert ratio(d, np.array(chosen)) == pytest.approx(brute, rel=1e-9)
    # a path that flips by 0.25 rad at one point among smooth stretches (probes crowded at the flip, as bisection
    # leaves them): the flip becomes one step among steps of the same size, not frames crowded into it
    angles = np.concatenate([np.linspace(0, 0.3, 7), 0.3 + np.geomspace(1e-4, 1e-2, 6), [0.55],
                             0.55 + np.linspace(0.05, 0.3, 6)])
    d = 1 - np.cos(angles[:, None] - angles[None, :])
    chosen = np.array(most_even_frames(d, 5))
    assert ratio(d, chosen) < 1.5
    crowded = np.array([0, 8, 10, 12, 19])  # three frames at the flip, as placing by arc shares through it does
    assert ratio(d, crowded) > 2


def test_perceptual_interpolate_places_frames_and_keeps_corners(tiny_pipe):
    corners = [Corner("a dog wearing a hat", {"dog": picture(1)}), Corner("a cat on the beach", {"cat": picture(2)})]
    settings = dict(num_inference_steps=2, guidance_scale=2.0, output_type="np", seed=3)
    uniform = tiny_pipe.interpolate(corners, steps=4, **settings)
    line = tiny_pipe.interpolate(corners, steps=4, spacing="perceptual", probes=7, **settings)
    ts = [c for _, c in line.positions]
    assert ts[0] == 0.0 and ts[-1] == 1.0 and np.all(np.diff(ts) > 0) and ts != [0, 1 / 3, 2 / 3, 1]
    assert np.array_equal(line.images[0], uniform.images[0]) and np.array_equal(line.images[-1], uniform.images[-1])
    alone = tiny_pipe.interpolate(corners, steps=4, positions=[line.positions[1]], **settings)
    assert np.abs(alone.images[0] - line.images[1]).max() < 1e-3  # the frame regenerates from its position
    from lambda_eclipse.encoders import encode_images

    def features_at(ts):  # the frames at ts through the pipeline's own image encoder
        pictures = tiny_pipe.interpolate(corners, steps=4, positions=[(0.0, t) for t in ts],
                                         **{**settings, "output_type": "pil"}).images
        return F.normalize(encode_images(tiny_pipe.image_processor, tiny_pipe.image_encoder, pictures), dim=-1)

    expected = perceptual_positions(2, 4, lambda where: features_at([c for _, c in where]), 7)
    assert np.allclose(ts, [c for _, c in expected], atol=1e-6)


def picture(seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).convert(mode)


def test_interpolate_corners_are_the_plain_call_and_a_frame_regenerates(tiny_pipe):
    corners = [Corner("a dog wearing a hat", {"dog": picture(1)}), Corner("a cat on the beach", {"cat": [picture(2), picture(3, "L")]})]
    settings = dict(num_inference_steps=2, guidance_scale=4.0, output_type="np")
    line = tiny_pipe.interpolate(corners, steps=3, seed=5, **settings)
    assert line.images.shape == (3, 16, 16, 3) and line.image_embeds.shape == (3, 32)
    for k, corner in ((0, corners[0]), (2, corners[1])):
        plain = tiny_pipe(corner.prompt, corner.subjects, generator=torch.Generator().manual_seed(5), **settings)
        assert np.array_equal(line.images[k], plain.images[0])  # bitwise what generate makes with the seed
        assert torch.equal(line.corner_embeds[k // 2], plain.image_embeds[0])
    alone = tiny_pipe.interpolate(corners, steps=3, seed=5, positions=[line.positions[1]], **settings)
    assert np.abs(alone.images[0] - line.images[1]).max() < 1e-3  # batched vs alone: float rounding only
    assert line.weights[1] == {"top_left": 0.5, "top_right": 0.5, "bottom_left": 0.0, "bottom_right": 0.0}
    grid = tiny_pipe.interpolate(["a dog", "a cat", "a hat", "the beach"], steps=2, path="lerp", seed=1, **settings)
    assert grid.images.shape == (4, 16, 16, 3)  # a grid of 2 steps: the corners alone


@pytest.mark.parametrize(
    "corners, kwargs, message",
    [
        (["a dog"], {}, "got 1; give 2 or 4"),
        (["a dog"] * 3, {}, "got 3"),
        (["a dog"] * 5, {}, "got 5"),
        ([torch.zeros(32), torch.zeros(16)], {}, "priors of different sizes"),
        ([torch.zeros(16), torch.zeros(16)], {}, "dimension 16"),
        (["a dog", "a cat"], {"steps": 1}, "steps"),
        (["a dog", "a cat"], {"path": "cubic"}, "unknown interpolation path"),
        (["a dog", "a cat"], {"spacing": "even"}, "unknown frame spacing"),
        (["a dog", "a cat"], {"spacing": "perceptual", "probes": 3}, "probes"),
        (["a dog", "a cat"], {"spacing": "perceptual", "output_type": "embeds"}, "cannot be used"),
        (["a dog", "a cat"], {"subject_scale": 3.0}, "subject_scale"),
        ([{"prompt": "a dog", "colour": "red"}, "a cat"], {}, "unknown keys"),
    ],
)
def test_bad_interpolations_are_one_line(tiny_pipe, corners, kwargs, message):
    with pytest.raises(UserError) as error:
        tiny_pipe.interpolate(corners, num_inference_steps=1, **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_written_files(tiny_pipe, tmp_path):
    from safetensors import safe_open

    from lambda_eclipse.interpolation_io import write_interpolation

    corners = [Corner("a dog on the beach"), Corner("a cat on the beach")]
    result = tiny_pipe.interpolate(corners, steps=3, seed=2, num_inference_steps=1)
    written = write_interpolation(result, corners, tmp_path / "out", {"steps": 1}, seed=2, path="slerp", steps=3)
    assert len(written["frames"]) == 3 and written["gif"].is_file() and written["grid"].is_file()
    info = Image.open(written["frames"][1]).text
    assert json.loads(info["weights"])["top_right"] == 0.5 and json.loads(info["corners"])[1]["prompt"] == "a cat on the beach"
    with Image.open(written["gif"]) as gif:
        assert gif.n_frames == 3
    grid = Image.open(written["grid"])
    assert grid.size == (48, 16 + 28)
    with safe_open(str(written["embeddings"]), "pt") as handle:
        assert handle.get_tensor("image_embeds").shape == (3, 32)
        assert json.loads(handle.metadata()["positions"])[2] == [0.0, 1.0]
    again = write_interpolation(result, corners, tmp_path / "out", {"steps": 1}, seed=2, path="slerp", steps=3)
    assert again["grid"] != written["grid"] and written["grid"].is_file()  # never overwrites
