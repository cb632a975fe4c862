"""The miniature-world concept oracle: network shapes, targets, scoring, training, save/load, resume."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from lambda_eclipse.miniworld.oracle import (
    CONFIG,
    WEIGHTS,
    Oracle,
    OracleNet,
    SceneReading,
    ShapeReading,
    load_oracle,
    oracle_accuracy,
    relation_from_centres,
    score_readings,
)
from lambda_eclipse.miniworld.oracle_train import augment, oracle_loss, scene_targets, train_oracle
from lambda_eclipse.miniworld.scenes import sample_scenes
from lambda_eclipse.miniworld.vocab import BG_COLOURS, BG_KINDS, COLOURS, SHAPES, TEXTURES


@pytest.fixture(scope="module")
def tiny_oracle(tmp_path_factory) -> Oracle:
    torch.set_num_threads(1)
    path = train_oracle(tmp_path_factory.mktemp("oracle") / "oracle", size=16, steps=4, batch=8, scenes=24,
                        eval_scenes=8)
    return load_oracle(path)


def _truth_reading(scene) -> SceneReading:
    """A reading that says exactly what the scene holds (centres from the tight boxes)."""
    truth = {o.shape: o for o in scene.objects}
    shapes = {}
    for s in SHAPES:
        o = truth.get(s)
        box = o.box if o else (0, 0, 0, 0)
        shapes[s] = ShapeReading(
            present=1.0 if o else 0.0, colour=o.colour if o else "red", colour_conf=1.0,
            texture=o.texture if o else "plain", texture_conf=1.0, size=o.size if o else "small", size_conf=1.0,
            centre=((box[0] + box[2]) / 2 / scene.size, (box[1] + box[3]) / 2 / scene.size),
        )
    return SceneReading(shapes, scene.background_colour, 1.0, scene.background_kind, 1.0)


def test_network_shapes_and_size():
    net = OracleNet()
    assert 100_000 <= sum(p.numel() for p in net.parameters()) <= 300_000
    for side in (16, 32):
        out = net(torch.rand(3, 3, side, side))
        assert out["presence"].shape == (3, len(SHAPES))
        assert out["colour"].shape == (3, len(SHAPES), len(COLOURS))
        assert out["texture"].shape == (3, len(SHAPES), len(TEXTURES))
        assert out["centre"].shape == (3, len(SHAPES), 2)
        assert ((out["centre"] >= 0) & (out["centre"] <= 1)).all()
        assert out["bg_colour"].shape == (3, len(BG_COLOURS)) and out["bg_kind"].shape == (3, len(BG_KINDS))


def test_scenes_never_repeat_a_shape_and_targets_match_labels():
    scenes = sample_scenes(200, seed=3, size=16) + sample_scenes(100, seed=3, size=16, split="heldout")
    assert all(len(set(s.nouns)) == len(s.nouns) for s in scenes)  # per-shape heads rely on this
    t = scene_targets(scenes)
    assert t.presence.sum().item() == sum(len(s.objects) for s in scenes)
    assert ((t.colour >= 0) == t.presence.bool()).all()
    first = scenes[0].objects[0]
    k = SHAPES.index(first.shape)
    assert list(COLOURS)[t.colour[0, k]] == first.colour and TEXTURES[t.texture[0, k]] == first.texture


def test_relation_from_centres():
    assert relation_from_centres((0.2, 0.5), (0.8, 0.45)) == "left of"
    assert relation_from_centres((0.8, 0.5), (0.2, 0.55)) == "right of"
    assert relation_from_centres((0.5, 0.1), (0.45, 0.9)) == "above"
    assert relation_from_centres((0.5, 0.9), (0.55, 0.1)) == "below"


def test_perfect_readings_score_perfectly():
    scenes = sample_scenes(60, seed=1, size=32, split="heldout")
    m = score_readings([_truth_reading(s) for s in scenes], scenes)
    for key in ("shape_f1", "colour_accuracy", "texture_accuracy", "size_accuracy", "background_colour_accuracy",
                "background_kind_accuracy", "colour_reserved_accuracy"):
        assert m[key] == 1.0, key
    assert m["relation_accuracy"] >= 0.95  # tight-box centres can disagree with the layout's boxes on near-ties
    assert m["n_images"] == 60 and m["n_objects"] == sum(len(s.objects) for s in scenes)
    assert m["n_objects_reserved"] >= 60  # every held-out scene has a reserved instance
    assert m["centre_error_px"] == 0.0
    assert m["colour_swapped"] == 0.0
    shapes = {o.shape for s in scenes for o in s.objects}
    assert {k for k in m if k.startswith("found_")} == {f"found_{shape}" for shape in shapes}
    assert all(m[f"found_{shape}"] == 1.0 for shape in shapes)


def test_found_by_shape_counts_each_object_of_that_shape():
    scenes = sample_scenes(40, seed=2, size=32, split="heldout")
    readings = [_truth_reading(s) for s in scenes]
    for r in readings:  # the oracle misses every star
        r.shapes["star"] = dataclasses.replace(r.shapes["star"], present=0.0)
    m = score_readings(readings, scenes)
    assert m["found_star"] == 0.0 and m["found_ball"] == 1.0
    stars = sum(o.shape == "star" for s in scenes for o in s.objects)
    assert m["shape_recall"] == pytest.approx(1 - stars / m["n_objects"])


def test_colour_swapped_counts_binding_errors_not_wrong_hues():
    scenes = [s for s in sample_scenes(80, seed=4, size=32, split="heldout") if len(s.objects) == 2]
    scenes = [s for s in scenes if s.objects[0].colour != s.objects[1].colour][:6]
    readings = [_truth_reading(s) for s in scenes]
    for r, s in zip(readings, scenes):  # first object read in the second's colour, second in a colour nobody has
        a, b = s.objects
        foreign = next(c for c in COLOURS if c not in (a.colour, b.colour))
        r.shapes[a.shape] = dataclasses.replace(r.shapes[a.shape], colour=b.colour)
        r.shapes[b.shape] = dataclasses.replace(r.shapes[b.shape], colour=foreign)
    m = score_readings(readings, scenes)
    assert m["colour_accuracy"] == 0.0 and m["colour_swapped"] == 0.5
    one = [s for s in sample_scenes(20, seed=4, size=32) if len(s.objects) == 1]
    assert "colour_swapped" not in score_readings([_truth_reading(s) for s in one], one)


def test_augment_is_seeded_and_in_range():
    x = torch.rand(6, 3, 16, 16)
    a = augment(x, torch.Generator().manual_seed(1))
    b = augment(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert (a - x).abs().mean() < 0.1  # light: colour names must survive


def test_train_save_load_and_read(tiny_oracle, tmp_path):
    folder = tmp_path / "again"
    path = train_oracle(folder, size=16, steps=4, batch=8, scenes=24, eval_scenes=8)
    assert sorted(p.name for p in path.iterdir()) == sorted([WEIGHTS, CONFIG])  # the release only, no temporaries
    assert (tmp_path / "again-run" / "checkpoints").is_dir()  # training state lives beside it
    again = load_oracle(path)
    assert "heldout_renders" in again.config["metrics"]
    scenes = sample_scenes(5, seed=2, size=16, split="heldout")
    arr = np.stack([s.image for s in scenes])
    p1, p2 = tiny_oracle.probs(arr), again.probs(arr)  # same seed and steps -> same weights
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    readings = tiny_oracle.read([Image.fromarray(a) for a in arr])
    assert len(readings) == 5 and set(readings[0].shapes) == set(SHAPES)
    tensor = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(tiny_oracle.probs(tensor)["presence"], p1["presence"])
    big = np.stack([np.asarray(Image.fromarray(a).resize((32, 32))) for a in arr])
    assert tiny_oracle.probs(big)["presence"].shape == (5, len(SHAPES))  # other sizes are resized
    acc = oracle_accuracy(tiny_oracle, scenes)
    assert acc["n_images"] == 5 and acc["n_objects"] == sum(len(s.objects) for s in scenes)
    truth = score_readings([_truth_reading(s) for s in scenes], scenes)
    assert truth["colour_accuracy"] == 1.0 and acc["colour_accuracy"] < 1.0  # 4 steps cannot read colours yet


def test_load_refuses_a_non_oracle_folder(tmp_path):
    from lambda_eclipse.errors import UserError

    with pytest.raises(UserError):
        load_oracle(tmp_path)


@pytest.mark.slow  # a whole build or install: the slow tier (CI runs it)
def test_a_short_run_learns_the_background():
    # 16 px and 150 steps take seconds; background colour is the easiest label, well above chance (0.2) by then
    torch.set_num_threads(1)
    torch.manual_seed(0)
    scenes = sample_scenes(400, seed=11, size=16)
    t = scene_targets(scenes)
    x = torch.from_numpy(t.images).permute(0, 3, 1, 2).float() / 255
    net = OracleNet(8)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(len(scenes), (32,), generator=g)
        loss = oracle_loss(net(x[idx]), t, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
    held = sample_scenes(100, seed=12, size=16, split="heldout")
    acc = oracle_accuracy(Oracle(net, {"size": 16}), held)
    assert acc["background_colour_accuracy"] > 0.6


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    from lambda_eclipse.train.checkpoint import list_checkpoints

    kw = {"size": 16, "steps": 6, "batch": 4, "scenes": 12, "eval_scenes": 0, "checkpoint_every": 2}
    straight = load_oracle(train_oracle(tmp_path / "a", **kw))
    train_oracle(tmp_path / "b", stop_after=3, **kw)
    assert [p.name for p in list_checkpoints(tmp_path / "b-run")] == ["step-000003"]
    assert not (tmp_path / "b" / CONFIG).exists()  # no release folder before the run is complete
    resumed = load_oracle(train_oracle(tmp_path / "b", **kw))
    for k, v in straight.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k


def test_training_names_are_reachable_from_the_oracle_module():
    from lambda_eclipse.miniworld import oracle

    assert oracle.train_oracle is train_oracle
